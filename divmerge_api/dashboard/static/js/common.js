// Shared by every page: the token (sessionStorage), API calls with the bearer header, sign-in/out,
// DOM building and formatting helpers.

import { FINISHED } from "/dashboard/constants.js"; // served from divmerge_service.models.JobStatus

export { FINISHED };

const KEY = "divmerge.token";

export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
  }
}

const token = () => sessionStorage.getItem(KEY);

/** fetch() on this origin with the bearer token; a 401 signs out, other errors throw ApiError. */
export async function api(path, { method = "GET", body, type = "application/json" } = {}) {
  const headers = { Authorization: `Bearer ${token()}` };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = type;
    init.body = type === "application/json" ? JSON.stringify(body) : body;
  }
  const r = await fetch(path, init);
  if (r.status === 401) {
    signOut("Your token was not accepted (missing, invalid or revoked). Sign in again.");
    throw new ApiError(401, "unauthorized", "not signed in");
  }
  if (!r.ok) {
    let err = {};
    try {
      err = (await r.json()).error || {};
    } catch {
      // not JSON
    }
    throw new ApiError(r.status, err.code || `http_${r.status}`, err.message || r.statusText, err.field);
  }
  return r;
}

export const getJson = async (path, opts) => (await api(path, opts)).json();

/** GET that answers null on 404 (a job without this resource, or an endpoint this server lacks). */
export async function getOptional(path) {
  try {
    return await getJson(path);
  } catch (e) {
    if (e instanceof ApiError && (e.status === 404 || e.status === 405)) return null;
    throw e;
  }
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  showSignIn(message);
}

function showSignIn(message) {
  document.getElementById("app").hidden = true;
  document.getElementById("sign-out").hidden = true;
  document.getElementById("signin").hidden = false;
  const err = document.getElementById("signin-error");
  err.hidden = !message;
  err.textContent = message || "";
  document.getElementById("token").focus();
}

/** Wire the sign-in form and the sign-out button; run main() once signed in. */
export function start(main) {
  for (const a of document.querySelectorAll(".top nav a")) {
    if (a.getAttribute("href") === location.pathname) a.setAttribute("aria-current", "page");
  }
  const form = document.getElementById("signin-form");
  let started = false;
  const enter = () => {
    document.getElementById("signin").hidden = true;
    document.getElementById("app").hidden = false;
    document.getElementById("sign-out").hidden = false;
    if (!started) {
      started = true;
      main();
    }
  };
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = document.getElementById("token");
    const value = input.value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY, value);
    try {
      await api("/v1/merges?limit=1");
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) showSignIn(`Could not reach the service: ${e.message}`);
      return;
    }
    input.value = "";
    if (started) location.reload();
    else enter();
  });
  document.getElementById("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    location.href = "/";
  });
  if (token()) enter();
  else showSignIn();
}

/** h("a", {href: "/x", class: "y"}, "text", child): an element; strings become text nodes. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function show(id, visible) {
  document.getElementById(id).hidden = !visible;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

export function ago(iso) {
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

export const when = (iso) => (iso ? h("time", { datetime: iso, title: new Date(iso).toLocaleString() }, ago(iso)) : "");

/** Seconds the job has run: to its end, or to now while it runs. */
export function elapsed(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
  return (end - Date.parse(job.started_at)) / 1000;
}

export function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i ? v.toFixed(1) : v} ${units[i]}`;
}

export const method = (job) => (job.spec && job.spec.merge_method) || "?";

export const badge = (status) => h("span", { class: `badge ${status}` }, status);

/** A progress bar with its stage, step/total and ETA (running or queued jobs). */
export function progressBar(job) {
  const p = job.progress || {};
  const total = p.total ?? p.total_steps;
  const parts = [p.stage || job.status];
  if (total) parts.push(`${p.step ?? 0}/${total}`);
  if (p.eta_s !== null && p.eta_s !== undefined) parts.push(`ETA ${duration(p.eta_s)}`);
  const label = parts.join(" · ");
  const bar = h("progress", { max: total || 1, "aria-label": label });
  if (job.status === "succeeded") bar.value = total || 1; // full, whatever the last (best-effort) write said
  else if (total) bar.value = Math.min(p.step ?? 0, total);
  else if (FINISHED.includes(job.status)) bar.value = 1;
  // no value: an indeterminate bar (a stage without steps)
  return h("div", { class: "progress" }, bar, h("span", { class: "progress-label" }, label));
}

/** Repeat fn every `ms` while it answers true and the page lives; errors are shown by fn itself. */
export function poll(fn, ms) {
  const tick = async () => {
    let again = true;
    try {
      again = await fn();
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return;
      console.warn(e);
    }
    if (again) setTimeout(tick, typeof ms === "function" ? ms() : ms);
  };
  return tick();
}
