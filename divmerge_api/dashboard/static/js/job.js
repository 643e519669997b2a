// The job page /jobs/{id}: status, progress, error, charts, files, model card, timeline and spec,
// polled while the job is queued or running.
import { heatmap, lossCurve } from "./charts.js";
import {
  ApiError, api, badge, bytes, duration, elapsed, FINISHED, getJson, getOptional, h, method, poll, progressBar,
  show, start, when,
} from "./common.js";
import { renderMarkdown } from "./markdown.js";
import { toYaml } from "./yaml.js";

const LEARNED = ["divmerge", "adamerging"]; // divmerge_core.config.LEARNED_METHODS
const jobId = decodeURIComponent(location.pathname.split("/")[2] || "");
const base = `/v1/merges/${encodeURIComponent(jobId)}`;

function fail(message) {
  const err = document.getElementById("job-error");
  err.textContent = message;
  err.hidden = !message;
}

function renderMeta(job) {
  const dl = document.getElementById("job-meta");
  const item = (k, v, wide) =>
    v === "" || v === null || v === undefined ? [] : [h("div", { class: wide ? "wide" : null }, h("dt", {}, k), h("dd", {}, v))];
  const res = job.result || {};
  dl.replaceChildren(
    ...item("Method", method(job)),
    ...item("Models", (job.spec.models || []).length),
    ...item("Queue", job.queue),
    ...item("Attempts", job.attempts),
    ...item("Created", when(job.created_at)),
    ...item("Started", job.started_at ? when(job.started_at) : ""),
    ...item("Finished", job.finished_at ? when(job.finished_at) : ""),
    ...item("Elapsed", duration(elapsed(job))),
    ...item("Destination", res.destination ? h("code", {}, res.destination) : "", true),
    ...item("Final loss", res.metrics && res.metrics.final_loss != null ? res.metrics.final_loss.toPrecision(5) : ""),
  );
}

function renderProgress(job) {
  const box = document.getElementById("progress");
  const p = job.progress || {};
  const notes = [];
  if (job.cancel_requested && !FINISHED.includes(job.status)) notes.push(h("p", { class: "muted" }, "Cancel requested: the worker stops at its next step."));
  if (p.loss !== null && p.loss !== undefined) notes.push(h("p", { class: "muted" }, `Current loss ${Number(p.loss).toPrecision(5)}`));
  const last = job.last_error;
  if (last && !FINISHED.includes(job.status)) notes.push(h("p", { class: "warn" }, `Last attempt failed: `, h("code", {}, last.code), ` ${last.message}`));
  if (job.kept && job.status === "failed") {
    notes.push(h("p", {}, `The merged result is kept until ${new Date(job.kept.until).toLocaleString()}: Retry delivers it again without merging.`));
  }
  box.replaceChildren(progressBar(job), ...notes);
}

function renderButtons(job) {
  const cancel = document.getElementById("cancel");
  cancel.hidden = FINISHED.includes(job.status);
  cancel.disabled = job.cancel_requested;
  document.getElementById("retry").hidden = job.status !== "failed"; // the API retries failed jobs only
}

function renderResolved(resolved) {
  const box = document.getElementById("resolved");
  const entries = Object.entries(resolved || {});
  if (!entries.length) {
    box.replaceChildren(h("p", { class: "muted" }, "Resolved when the job starts."));
    return;
  }
  const rows = entries.map(([ref, sha]) => h("tr", {}, h("td", {}, h("code", {}, ref)), h("td", {}, sha ? h("code", { title: sha }, sha.slice(0, 12)) : h("span", { class: "muted" }, "local folder"))));
  box.replaceChildren(h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Reference"), h("th", { scope: "col" }, "Commit"))), h("tbody", {}, rows))));
}

async function renderEvents() {
  const data = await getOptional(`${base}/events`);
  show("events-section", !!data);
  if (!data) return;
  const list = document.getElementById("events");
  list.replaceChildren(
    ...data.events.map((e) =>
      h(
        "li",
        { class: `event ${e.kind}` },
        h("time", { class: "event-time", datetime: e.at, title: new Date(e.at).toLocaleString() }, new Date(e.at).toLocaleTimeString()),
        " ",
        h("strong", {}, e.kind),
        // "stage" events say "stage optimise": the kind is not repeated
        e.message ? ` ${e.message.startsWith(`${e.kind} `) ? e.message.slice(e.kind.length + 1) : e.message}` : "",
      ),
    ),
  );
}

const pct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)}`);

/** One horizontal bar (0..1) with its value; the width is set through the CSSOM (the CSP allows no inline styles). */
function bar(series, label, value, selected) {
  const fill = h("span", { class: `eval-fill ${series}` });
  fill.style.width = `${Math.max(0, Math.min(1, value ?? 0)) * 100}%`;
  return h(
    "div",
    { class: `eval-bar${selected ? " selected" : ""}`, "data-series": label, "data-value": value ?? "" },
    h("span", { class: "eval-name" }, label),
    h("span", { class: "eval-track" }, fill),
    h("span", { class: "eval-num" }, pct(value)),
  );
}

async function renderEvaluation(job) {
  const evaluated = (job.spec.models || []).some((m) => m.eval);
  const data = evaluated && ["succeeded", "failed"].includes(job.status) ? await getOptional(`${base}/evaluation`).catch(() => null) : null;
  show("evaluation-section", !!data);
  if (!data) return;
  const summary = document.getElementById("evaluation-summary");
  const box = document.getElementById("evaluation");
  if (data.error) {
    summary.replaceChildren(h("span", { class: "warn" }, "The evaluation failed (the merge is kept): "), h("code", {}, data.code || "error"), ` ${data.error}`);
    box.replaceChildren();
    return;
  }
  const ci = data.anp_ci95 ? ` [${data.anp_ci95[0].toFixed(1)}, ${data.anp_ci95[1].toFixed(1)}]` : "";
  const anps = data.compare.map((c) => `${c.label} ${c.anp === null ? "–" : c.anp.toFixed(1)}`).join(" · ");
  summary.replaceChildren(
    h("strong", { "data-testid": "anp" }, `ANP ${data.anp === null ? "–" : data.anp.toFixed(1)}`), ci,
    ` · output: ${data.selected}${data.select ? ` (select: ${data.select})` : ""}`,
    data.compare.length > 1 ? h("span", { class: "muted" }, ` · ${anps}`) : "",
  );
  const rows = Object.entries(data.tasks).map(([name, t]) => {
    const bars = [bar("expert", "expert", t.expert)];
    if (t.base !== null && t.base !== undefined) bars.push(bar("base", "base", t.base));
    for (const c of data.compare) bars.push(bar("merged", c.label, (c.tasks[name] || {}).merged, c.label === data.selected));
    return h(
      "tr",
      { "data-task": name },
      h("th", { scope: "row" }, name, h("div", { class: "muted" }, `n ${t.n} · ${t.metric}`)),
      h("td", {}, bars),
      h("td", { class: "num" }, t.retained === null ? "–" : t.retained.toFixed(1)),
      h("td", { class: "num" }, pct(t.unparsed)),
    );
  });
  const head = h("thead", {}, h("tr", {}, ...["Task", "Expert / merges", "Retained", "Unparsed %"].map((c) => h("th", { scope: "col" }, c))));
  const warnings = (data.warnings || []).map((w) => h("p", { class: "warn" }, w));
  box.replaceChildren(h("div", { class: "table-wrap" }, h("table", { class: "evaluation" }, head, h("tbody", {}, rows))), ...warnings);
}

async function renderCharts(job) {
  // only learned methods have coefficients (the endpoint answers 404 for the others)
  const data = LEARNED.includes(method(job)) ? await getOptional(`${base}/coefficients`) : null;
  const losses = data && data.losses ? data.losses : [];
  show("loss-section", losses.length > 0);
  const heldout = data && data.heldout ? data.heldout : [];
  if (losses.length) lossCurve(document.getElementById("loss-curve"), losses, document.getElementById("loss-readout"), heldout);
  show("heatmap-section", !!data);
  const box = document.getElementById("coefficients-heatmap");
  const readout = document.getElementById("heatmap-readout");
  if (data && data.values && data.values.length && data.tasks.length) heatmap(box, data, readout);
  else if (data) {
    const why = FINISHED.includes(job.status) ? "This job ended without coefficients." : "The coefficients appear when the merge is done.";
    box.replaceChildren(h("p", { class: "muted" }, why));
    readout.textContent = "";
  }
}

/** Download with the bearer header (the token never goes in a URL): fetch, then save the blob. */
async function download(ev, name) {
  ev.preventDefault();
  try {
    const blob = await (await api(`${base}/files/${encodeURIComponent(name)}`)).blob();
    const url = URL.createObjectURL(blob);
    const a = h("a", { href: url, download: name.split("/").pop() });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) {
    fail(`Download of ${name} failed: ${e.message}`);
  }
}

async function renderOutputs(job) {
  const data = job.status === "succeeded" ? await getOptional(`${base}/files`) : null;
  show("files-section", !!data);
  if (!data) {
    show("card-section", false);
    return;
  }
  const hub = document.getElementById("hub");
  hub.hidden = !data.hub;
  if (data.hub) hub.replaceChildren("Uploaded to the Hub: ", h("code", {}, data.hub.repo_id), data.hub.commit ? [" at commit ", h("code", {}, data.hub.commit.slice(0, 12))] : "");
  const rows = data.files.map((f) =>
    h(
      "tr",
      {},
      h("td", {}, h("a", { href: `${base}/files/${encodeURIComponent(f.name)}`, download: f.name, onclick: (ev) => download(ev, f.name) }, f.name)),
      h("td", { class: "num" }, bytes(f.size)),
      h("td", { class: "opt" }, f.sha256 ? h("code", { title: f.sha256 }, f.sha256.slice(0, 16)) : ""),
    ),
  );
  document.querySelector("#files tbody").replaceChildren(...rows);
  const card = data.files.find((f) => f.name === "README.md");
  show("card-section", !!card);
  if (card) {
    const text = await (await api(`${base}/files/README.md`)).text();
    document.getElementById("model-card").innerHTML = renderMarkdown(text);
  }
}

start(() => {
  document.getElementById("job-id").textContent = jobId;
  let job = null;
  let outputsShown = false;

  async function refresh() {
    try {
      job = await getJson(base);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        fail(`No job ${jobId} for your team.`);
        return false;
      }
      fail(`Could not load the job: ${e.message}`);
      return true;
    }
    fail("");
    document.title = `Job ${job.id} (${job.status}) · DivMerge`;
    document.getElementById("job-status").replaceWith(Object.assign(badge(job.status), { id: "job-status" }));
    show("job-body", true);
    renderMeta(job);
    renderProgress(job);
    renderButtons(job);
    show("failure", !!job.error);
    if (job.error) {
      document.getElementById("failure-code").textContent = job.error.code;
      document.getElementById("failure-message").textContent = job.error.message;
    }
    document.getElementById("spec").textContent = toYaml(job.spec);
    renderResolved(job.resolved);
    await Promise.all([renderEvents(), renderCharts(job)]);
    const done = FINISHED.includes(job.status);
    if (done && !outputsShown) {
      outputsShown = true;
      await Promise.all([renderOutputs(job), renderEvaluation(job)]);
    }
    return !done;
  }

  const follow = () => poll(refresh, 1000);

  document.getElementById("cancel").addEventListener("click", async () => {
    if (!confirm(`Cancel job ${jobId}?`)) return;
    try {
      await api(`${base}/cancel`, { method: "POST" });
    } catch (e) {
      fail(`Cancel failed: ${e.message}`);
    }
    await refresh().catch(() => {});
  });
  document.getElementById("retry").addEventListener("click", async () => {
    try {
      const next = await getJson(`${base}/retry`, { method: "POST" });
      if (next.id !== jobId) location.href = `/jobs/${encodeURIComponent(next.id)}`;
      else {
        outputsShown = false;
        follow();
      }
    } catch (e) {
      fail(`Retry failed: ${e.message}`);
    }
  });
  follow();
});
