// New merge at /new: a YAML editor prefilled from a template, "Validate" (the dry run) with its problems
// shown next to the lines they name, and "Submit" (POST /v1/merges as application/yaml).
import { ApiError, getJson, h, start } from "./common.js";
import { fieldLines, lineOf } from "./yaml.js";

start(() => {
  const editor = document.getElementById("spec");
  const gutter = document.getElementById("gutter");
  const template = document.getElementById("template");
  const status = document.getElementById("new-status");
  const list = document.getElementById("problems");
  let loaded = ""; // the template text as loaded (edits are confirmed before a template replaces them)
  let marks = new Map(); // line -> messages

  function drawGutter() {
    const n = editor.value.split("\n").length;
    const lines = [];
    for (let i = 1; i <= n; i++) {
      const mark = marks.get(i);
      lines.push(mark ? h("span", { class: "mark", title: mark.join("\n") }, `! ${i}`) : h("span", {}, String(i)), "\n");
    }
    gutter.replaceChildren(...lines);
    gutter.scrollTop = editor.scrollTop;
  }

  function goTo(line) {
    const starts = editor.value.split("\n").slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
    const end = editor.value.indexOf("\n", starts);
    editor.focus();
    editor.setSelectionRange(starts, end < 0 ? editor.value.length : end);
  }

  function showProblems(problems, estimate) {
    const map = fieldLines(editor.value);
    marks = new Map();
    list.replaceChildren(
      ...problems.map((p) => {
        // a YAML syntax error names no field but its line ("... line 7, column 3")
        const line = lineOf(map, p.field) || Number((/\bline (\d+)/.exec(p.message) || [])[1]) || null;
        if (line) marks.set(line, [...(marks.get(line) || []), p.message]);
        const where = [line ? `line ${line}` : null, p.field].filter(Boolean).join(" · ");
        const head = line
          ? h("button", { type: "button", class: "link", onclick: () => goTo(line) }, where)
          : h("span", { class: "where" }, where || "config");
        return h("li", { class: "problem" }, head, " ", h("code", {}, p.code), h("div", {}, p.message));
      }),
    );
    document.getElementById("problems-none").textContent = problems.length ? "" : "No problems found.";
    const est = document.getElementById("estimate");
    est.hidden = !estimate;
    if (estimate) {
      document.getElementById("estimate-list").replaceChildren(
        ...Object.entries(estimate).map(([k, v]) => h("div", {}, h("dt", {}, k.replaceAll("_", " ")), h("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v)))),
      );
    }
    drawGutter();
  }

  async function loadTemplate() {
    const r = await fetch(`/static/examples/${template.value}.yaml`);
    loaded = await r.text();
    editor.value = loaded;
    showProblems([], null);
    document.getElementById("problems-none").textContent = "Press Validate to check the config without running it.";
  }

  const problemsOf = (e) =>
    e instanceof ApiError ? [{ code: e.code, message: e.message, field: e.field }] : [{ code: "error", message: e.message, field: null }];

  async function validate() {
    status.textContent = "Validating…";
    try {
      const res = await getJson("/v1/merges/validate", { method: "POST", body: editor.value, type: "application/yaml" });
      showProblems(res.problems || [], res.estimate || null);
      status.textContent = res.ok ? "Valid." : `${(res.problems || []).length} problem(s).`;
      return res.ok;
    } catch (e) {
      showProblems(problemsOf(e), null);
      status.textContent = e instanceof ApiError && e.status === 404 ? "This server has no dry-run validation." : "Not valid.";
      return false;
    }
  }

  template.addEventListener("change", () => {
    if (editor.value !== loaded && !confirm("Replace your edits with the template?")) return;
    loadTemplate();
  });
  editor.addEventListener("input", drawGutter);
  editor.addEventListener("scroll", () => {
    gutter.scrollTop = editor.scrollTop;
  });
  document.getElementById("validate").addEventListener("click", validate);
  document.getElementById("new-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const submit = document.getElementById("submit");
    submit.disabled = true;
    status.textContent = "Submitting…";
    try {
      const job = await getJson("/v1/merges", { method: "POST", body: editor.value, type: "application/yaml" });
      location.href = `/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      showProblems(problemsOf(e), null);
      status.textContent = "Not submitted.";
      submit.disabled = false;
    }
  });
  loadTemplate();
});
