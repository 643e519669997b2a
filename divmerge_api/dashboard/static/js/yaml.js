// YAML for the spec view (toYaml) and the editor's field -> line map (fieldLines).

const PLAIN = /^[A-Za-z0-9_./@~+(][A-Za-z0-9_./@~+ ()=,-]*$/;
const SPECIAL = /^(true|false|yes|no|on|off|null|~|y|n)$/i;

function scalar(v) {
  if (v === null || v === undefined) return "null";
  if (typeof v === "boolean") return String(v);
  // PyYAML (YAML 1.1) reads 1e-8 as a string: its floats need a dot ("1.0e-8")
  if (typeof v === "number") return String(v).replace(/^(-?\d+)e/, "$1.0e");
  const s = String(v);
  const plain = PLAIN.test(s) && !s.endsWith(" ") && !SPECIAL.test(s) && Number.isNaN(Number(s));
  return plain ? s : JSON.stringify(s); // JSON strings are YAML double-quoted scalars
}

const isCollection = (v) => v !== null && typeof v === "object" && Object.keys(v).length > 0;

function lines(v, pad) {
  if (Array.isArray(v)) {
    return v.flatMap((item) => {
      if (!isCollection(item)) return [`${pad}- ${inline(item)}`];
      const inner = lines(item, `${pad}  `);
      inner[0] = `${pad}- ${inner[0].slice(pad.length + 2)}`;
      return inner;
    });
  }
  return Object.entries(v).flatMap(([k, val]) =>
    isCollection(val) ? [`${pad}${scalar(k)}:`, ...lines(val, Array.isArray(val) ? pad : `${pad}  `)] : [`${pad}${scalar(k)}: ${inline(val)}`],
  );
}

const inline = (v) => (Array.isArray(v) ? "[]" : v !== null && typeof v === "object" ? "{}" : scalar(v));

/** A JSON value as block YAML (keys in their order). */
export function toYaml(value) {
  return isCollection(value) ? `${lines(value, "").join("\n")}\n` : `${inline(value)}\n`;
}

const KEY = /^("[^"]*"|'[^']*'|[^\s#"'{[\-][^:#]*?|-[^\s:#][^:#]*?)\s*:(\s|$)/;

/** Map "a.b.0.c" paths to the 1-based line where they start, for block YAML as people write it. */
export function fieldLines(text) {
  const map = new Map();
  const stack = []; // {indent, path, item}
  const counts = new Map(); // list path -> items seen
  text.split("\n").forEach((raw, i) => {
    const line = raw.replace(/\s+#.*$/, "");
    if (!line.trim() || line.trim().startsWith("#")) return;
    let indent = line.search(/\S/);
    let rest = line.slice(indent);
    const isItem = rest === "-" || rest.startsWith("- ");
    // a list may sit at its key's indent ("models:\n- model: x")
    while (stack.length) {
      const top = stack[stack.length - 1];
      if (top.indent > indent || (top.indent === indent && (!isItem || top.item))) stack.pop();
      else break;
    }
    if (isItem) {
      const parent = stack.length ? stack[stack.length - 1].path : "";
      const n = counts.get(parent) || 0;
      counts.set(parent, n + 1);
      const path = parent ? `${parent}.${n}` : String(n);
      map.set(path, i + 1);
      stack.push({ indent, path, item: true });
      rest = rest.slice(1);
      const skip = rest.search(/\S/);
      if (skip < 0) return;
      indent += 1 + skip;
      rest = rest.slice(skip);
    }
    const m = KEY.exec(rest);
    if (!m) return;
    const key = m[1].replace(/^["']|["']$/g, "");
    const parent = stack.length ? stack[stack.length - 1].path : "";
    const path = parent ? `${parent}.${key}` : key;
    if (!map.has(path)) map.set(path, i + 1);
    counts.delete(path); // a key seen again starts its list anew
    stack.push({ indent, path, item: false });
  });
  return map;
}

/** The line of a problem's field ("models.1.model", "models[1].model"): its longest known prefix. */
export function lineOf(map, field) {
  if (!field) return null;
  const parts = String(field).replace(/\[(\d+)\]/g, ".$1").split(".").filter(Boolean);
  for (let n = parts.length; n > 0; n--) {
    const line = map.get(parts.slice(0, n).join("."));
    if (line) return line;
  }
  return null;
}
