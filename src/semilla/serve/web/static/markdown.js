// A small Markdown renderer that builds DOM nodes, never HTML strings.
//
// Model output and user text are untrusted: every piece of text becomes a text node, raw HTML
// shows as the characters it is, links keep only http(s) and mailto targets, and images are
// never loaded (they render as a text link), so a reply can neither run script nor fetch
// anything. Supported: fenced code blocks, `code`, **bold**, *italic*, headings, lists,
// block quotes, rules, links, paragraphs and line breaks.

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

function node(tag, className, ...children) {
  const n = document.createElement(tag);
  if (className) n.className = className;
  for (const c of children) n.append(c);
  return n;
}

/** The URL as a safe href, or null for javascript:, data:, vbscript: and anything unparsable. */
export function safeHref(raw) {
  try {
    const url = new URL(raw, "http://invalid.invalid/");
    if (!SAFE_PROTOCOLS.has(url.protocol) || url.hostname === "invalid.invalid") return null;
    return url.href;
  } catch {
    return null;
  }
}

// Inline: code spans first (their content is literal), then images, links, bold, italic.
const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|!\[([^\]]*)\]\(([^)\s]*)\)|\[([^\]]+)\]\(([^)\s]*)\)|\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__|\*(?=[^\s*])([\s\S]*?[^\s*])\*|\b_(?=\S)([\s\S]*?\S)_\b/;

function renderInline(text, parent) {
  let rest = text;
  while (rest) {
    const m = INLINE.exec(rest);
    if (!m) {
      appendLines(parent, rest);
      return;
    }
    if (m.index > 0) appendLines(parent, rest.slice(0, m.index));
    if (m[1] !== undefined) {
      parent.append(node("code", null, document.createTextNode(m[2])));
    } else if (m[3] !== undefined) {
      const href = safeHref(m[4]);
      const label = `[image: ${m[3] || "untitled"}]`;
      parent.append(href ? link(href, label) : document.createTextNode(label));
    } else if (m[5] !== undefined) {
      const href = safeHref(m[6]);
      if (href) {
        const a = link(href, "");
        renderInline(m[5], a);
        parent.append(a);
      } else {
        parent.append(document.createTextNode(m[0])); // shown as typed, never a link
      }
    } else if (m[7] !== undefined || m[8] !== undefined) {
      const strong = node("strong");
      renderInline(m[7] ?? m[8], strong);
      parent.append(strong);
    } else {
      const em = node("em");
      renderInline(m[9] ?? m[10], em);
      parent.append(em);
    }
    rest = rest.slice(m.index + m[0].length);
  }
}

function link(href, text) {
  const a = node("a", null, document.createTextNode(text));
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  a.referrerPolicy = "no-referrer";
  return a;
}

function appendLines(parent, text) {
  const lines = text.split("\n");
  lines.forEach((line, i) => {
    if (i > 0) parent.append(document.createElement("br"));
    if (line) parent.append(document.createTextNode(line));
  });
}

const FENCE = /^(\s*)(```+|~~~+)\s*([\w+.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;

/**
 * Render `text` as Markdown into a DocumentFragment. An unclosed code fence (a reply still
 * streaming) renders as a code block up to the end.
 */
export function renderMarkdown(text, { onCopy } = {}) {
  const out = document.createDocumentFragment();
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) {
      const p = node("p");
      renderInline(paragraph.join("\n"), p);
      out.append(p);
      paragraph = [];
    }
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      flush();
      const marker = fence[2];
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(marker)) body.push(lines[i++]);
      i += 1; // the closing fence (or past the end)
      out.append(codeBlock(body.join("\n"), fence[3], onCopy));
      continue;
    }
    if (!line.trim()) {
      flush();
      i += 1;
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      flush();
      const h = node(`h${Math.min(heading[1].length + 2, 6)}`);
      renderInline(heading[2], h);
      out.append(h);
      i += 1;
      continue;
    }
    if (RULE.test(line) && !paragraph.length) {
      out.append(node("hr"));
      i += 1;
      continue;
    }
    if (BULLET.test(line) || NUMBERED.test(line)) {
      flush();
      const ordered = !BULLET.test(line);
      const pattern = ordered ? NUMBERED : BULLET;
      const list = node(ordered ? "ol" : "ul");
      if (ordered) list.start = Number(NUMBERED.exec(line)[1]);
      while (i < lines.length && pattern.test(lines[i])) {
        const m = pattern.exec(lines[i]);
        const li = node("li");
        renderInline(ordered ? m[2] : m[1], li);
        list.append(li);
        i += 1;
      }
      out.append(list);
      continue;
    }
    if (QUOTE.test(line)) {
      flush();
      const quoted = [];
      while (i < lines.length && QUOTE.test(lines[i])) quoted.push(QUOTE.exec(lines[i++])[1]);
      out.append(node("blockquote", null, renderMarkdown(quoted.join("\n"), { onCopy })));
      continue;
    }
    paragraph.push(line);
    i += 1;
  }
  flush();
  return out;
}

function codeBlock(code, lang, onCopy) {
  const pre = node("pre", "code-block");
  const bar = node("div", "code-bar", node("span", "code-lang", document.createTextNode(lang || "code")));
  if (onCopy) {
    const button = node("button", "small ghost", document.createTextNode("Copy"));
    button.type = "button";
    button.addEventListener("click", () => onCopy(code, button));
    bar.append(button);
  }
  const c = node("code", null, document.createTextNode(code));
  if (lang) c.dataset.lang = lang;
  pre.append(bar, c);
  return pre;
}
