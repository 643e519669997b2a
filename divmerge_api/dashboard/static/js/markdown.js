// A small, safe markdown renderer for model cards: every piece of text is HTML-escaped before any tag is
// added; headings, paragraphs, lists, tables, fenced code, inline code, emphasis and http(s) links only.
// Images become links (the page fetches nothing from other hosts); YAML front matter is shown as code.

const esc = (s) =>
  String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

const SAFE_URL = /^(https?:\/\/|\/|#)/i;

function inline(text) {
  const codes = [];
  let s = text.replace(/`([^`]+)`/g, (_, c) => {
    codes.push(`<code>${esc(c)}</code>`);
    return `\u0000${codes.length - 1}\u0000`;
  });
  s = esc(s);
  s = s.replace(/!?\[([^\]]+)\]\(([^)\s]+)\)/g, (all, label, url) => {
    const href = url.replace(/&amp;/g, "&");
    if (!SAFE_URL.test(href)) return label;
    return `<a href="${esc(href)}" rel="noopener noreferrer">${label}</a>`;
  });
  s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>").replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>");
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => codes[Number(i)]);
}

const cells = (line) =>
  line
    .trim()
    .replace(/^\|/, "")
    .replace(/\|$/, "")
    .split("|")
    .map((c) => c.trim());

/** Markdown text -> HTML string (safe to assign to innerHTML). */
export function renderMarkdown(md) {
  let text = String(md).replace(/\r\n?/g, "\n");
  const out = [];
  const fm = /^---\n([\s\S]*?)\n---\n/.exec(text);
  if (fm) {
    out.push(`<details><summary>Metadata</summary><pre class="code"><code>${esc(fm[1])}</code></pre></details>`);
    text = text.slice(fm[0].length);
  }
  const lines = text.split("\n");
  let para = [];
  const flush = () => {
    if (para.length) out.push(`<p>${inline(para.join(" "))}</p>`);
    para = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let m;
    if ((m = /^```\s*([\w-]*)/.exec(line))) {
      flush();
      const body = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) body.push(lines[i]);
      out.push(`<pre class="code"><code>${esc(body.join("\n"))}</code></pre>`);
    } else if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) {
      flush();
      const level = Math.min(6, m[1].length + 2); // the card sits under the page's h2
      out.push(`<h${level}>${inline(m[2])}</h${level}>`);
    } else if (line.trim().startsWith("|") && i + 1 < lines.length && /^\s*\|?\s*:?-{3,}/.test(lines[i + 1])) {
      flush();
      const head = cells(line);
      const rows = [];
      for (i += 2; i < lines.length && lines[i].trim().startsWith("|"); i++) rows.push(cells(lines[i]));
      i--;
      const th = head.map((c) => `<th scope="col">${inline(c)}</th>`).join("");
      const trs = rows.map((r) => `<tr>${r.map((c) => `<td>${inline(c)}</td>`).join("")}</tr>`).join("");
      out.push(`<div class="table-wrap"><table><thead><tr>${th}</tr></thead><tbody>${trs}</tbody></table></div>`);
    } else if ((m = /^\s*([-*+]|\d+\.)\s+(.*)$/.exec(line))) {
      flush();
      const ordered = /\d/.test(m[1]);
      const items = [];
      for (; i < lines.length && (m = /^\s*([-*+]|\d+\.)\s+(.*)$/.exec(lines[i])); i++) items.push(`<li>${inline(m[2])}</li>`);
      i--;
      out.push(ordered ? `<ol>${items.join("")}</ol>` : `<ul>${items.join("")}</ul>`);
    } else if (!line.trim()) {
      flush();
    } else {
      para.push(line.trim());
    }
  }
  flush();
  return out.join("\n");
}
