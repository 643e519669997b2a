// The jobs list at /: newest first, filtered by status, polled while anything is queued or running.
import { badge, duration, elapsed, FINISHED, getJson, h, method, poll, progressBar, show, start, when } from "./common.js";

const PAGE = 25;
const MAX = 100; // the API's list_limit_max default

start(() => {
  const filter = document.getElementById("status-filter");
  const tbody = document.querySelector("#jobs tbody");
  const more = document.getElementById("more");
  const rows = new Map(); // job id -> {tr, key}
  let limit = PAGE;
  filter.value = new URLSearchParams(location.search).get("status") || "";

  function row(job) {
    const link = h("a", { href: `/jobs/${encodeURIComponent(job.id)}` }, job.id);
    const active = !FINISHED.includes(job.status);
    return [
      h("td", { class: "id" }, link),
      h("td", {}, badge(job.status), job.cancel_requested && active ? h("span", { class: "muted" }, " cancelling") : null),
      h("td", {}, method(job)),
      h("td", { class: "opt num" }, (job.spec.models || []).length),
      h("td", { class: "opt" }, when(job.created_at)),
      h("td", { class: "num" }, duration(elapsed(job))),
      h("td", { class: "progress-cell" }, active ? progressBar(job) : job.error ? h("code", {}, job.error.code) : ""),
    ];
  }

  function render(items) {
    const seen = new Set();
    let prev = null;
    for (const job of items) {
      seen.add(job.id);
      const key = JSON.stringify([job.status, job.progress, job.finished_at, job.cancel_requested, job.error]);
      let entry = rows.get(job.id);
      if (!entry) {
        entry = { tr: h("tr", { "data-job-id": job.id }), key: null };
        rows.set(job.id, entry);
      }
      // cells of a running job are rebuilt each time (elapsed time); the link cell is kept for focus
      if (entry.key !== key || !FINISHED.includes(job.status)) {
        const cells = row(job);
        if (entry.tr.cells.length) for (let i = 1; i < cells.length; i++) entry.tr.cells[i].replaceWith(cells[i]);
        else entry.tr.append(...cells);
        entry.key = key;
      }
      if (prev ? prev.nextSibling !== entry.tr : tbody.firstChild !== entry.tr) {
        if (prev) prev.after(entry.tr);
        else tbody.prepend(entry.tr);
      }
      prev = entry.tr;
    }
    for (const [id, entry] of rows) {
      if (!seen.has(id)) {
        entry.tr.remove();
        rows.delete(id);
      }
    }
  }

  let generation = 0; // a reply to an older query (before a filter change) is dropped

  async function refresh() {
    const mine = ++generation;
    const q = new URLSearchParams({ limit: String(limit) });
    if (filter.value) q.set("status", filter.value);
    let data;
    try {
      data = await getJson(`/v1/merges?${q}`);
      show("jobs-error", false);
    } catch (e) {
      const err = document.getElementById("jobs-error");
      err.textContent = `Could not load the jobs: ${e.message}`;
      err.hidden = false;
      throw e;
    }
    if (mine !== generation) return data.items;
    render(data.items);
    show("jobs-empty", data.items.length === 0);
    more.hidden = !data.next_cursor || limit >= MAX;
    document.getElementById("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
    return data.items;
  }

  let active = false;
  poll(async () => {
    const items = await refresh();
    active = items.some((j) => !FINISHED.includes(j.status));
    return true;
  }, () => (active ? 1500 : 5000));

  filter.addEventListener("change", () => {
    history.replaceState(null, "", filter.value ? `/?status=${encodeURIComponent(filter.value)}` : "/");
    limit = PAGE;
    refresh().catch(() => {});
  });
  more.addEventListener("click", () => {
    limit = Math.min(MAX, limit + PAGE);
    refresh().catch(() => {});
  });
});
