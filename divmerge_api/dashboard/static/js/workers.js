// The workers page at /workers (admin): GET /v1/workers, polled every 5 s.
import { ApiError, bytes, getJson, h, poll, show, start, when } from "./common.js";

const devices = (w) =>
  w.devices.map((d) => `${d.kind}${d.kind === "cuda" ? `:${d.index}` : ""} ${bytes(d.free)} free of ${bytes(d.total)}`).join(", ");

start(() => {
  const tbody = document.querySelector("#workers tbody");
  const error = document.getElementById("workers-error");
  poll(async () => {
    let list;
    try {
      list = await getJson("/v1/workers");
    } catch (e) {
      if (e instanceof ApiError && e.status === 403) {
        error.textContent = "Only an admin token can see the workers.";
        show("workers-error", true);
        return false;
      }
      throw e;
    }
    show("workers-error", false);
    tbody.replaceChildren(
      ...list.items.map((w) =>
        h(
          "tr",
          { "data-worker": w.name },
          h("td", { class: "id" }, w.name),
          h("td", {}, h("code", {}, w.worker_class)),
          h("td", {}, devices(w)),
          h("td", { class: "num" }, `${bytes(w.host_available)} free of ${bytes(w.host_total)}`),
          h("td", { class: "opt" }, w.queues.join(", ")),
          h("td", {}, when(w.last_seen)),
        ),
      ),
    );
    show("workers-empty", list.items.length === 0);
    document.getElementById("workers-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    return true;
  }, 5000);
});
