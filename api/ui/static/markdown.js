// Replies as Markdown, safely. markdown-it with `html: false` escapes any HTML in the text
// (model or user), and DOMPurify then removes whatever markup could still run script, so
// no text can inject HTML whatever it holds.

import markdownit from "./vendor/markdown-it/markdown-it.esm.min.mjs";
import DOMPurify from "./vendor/dompurify/purify.es.mjs";

const md = markdownit({ html: false, linkify: true, breaks: true });

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
  // An image in a reply would be a request to wherever the model pointed.
  if (node.tagName === "IMG") node.remove();
});

export function renderMarkdown(element, text) {
  const html = md.render(text);
  element.replaceChildren(DOMPurify.sanitize(html, { RETURN_DOM_FRAGMENT: true }));
}

// `<think>…</think>` split off the streamed text, as the API splits it in stored results.
// An open `<think>` with no end yet is all reasoning so far.
export function splitThinking(text) {
  const start = text.indexOf("<think>");
  if (start < 0) {
    const end = text.indexOf("</think>");
    // Templates that open the block themselves stream only its end.
    if (end < 0) return { reasoning: "", content: text };
    return { reasoning: text.slice(0, end).trim(), content: text.slice(end + 8).trimStart() };
  }
  const end = text.indexOf("</think>", start);
  if (end < 0) return { reasoning: text.slice(start + 7).trim(), content: text.slice(0, start) };
  return {
    reasoning: text.slice(start + 7, end).trim(),
    content: (text.slice(0, start) + text.slice(end + 8)).trimStart(),
  };
}
