// The page's own modules (Markdown, reasoning, the event-stream reader), run in Chromium
// on the page's origin by tests/test_ui_serving.py; it asserts on what this returns.
async () => {
  const { renderMarkdown, splitThinking } = await import("/ui/markdown.js");
  const { readEvents } = await import("/ui/sse.js");
  const render = (text) => { const box = document.createElement("div");
                             renderMarkdown(box, text); return box; };
  const rich = render("**bold** and `code`\n\n```python\nprint(1)\n```\n\n- a\n- b");
  const evil = render("<script>alert(1)</script><img src=x onerror=alert(2)> [x](javascript:alert(3)) ![i](http://example.com/i.png) <a href=x onclick=alert(4)>y</a>");
  const chunks = ["id: 1-1\r\nevent: delta\r\ndata: {\"text\": \"Hel", "lo\"}\r\n\r\n: keep-alive\n\n",
                  "id: 1-2\nevent: done\ndata: {}\n\n"];
  const body = new ReadableStream({ start(c) { for (const x of chunks) c.enqueue(new TextEncoder().encode(x)); c.close(); } });
  const events = [];
  for await (const e of readEvents(body)) events.push(e);
  return {
    rich: { strong: rich.querySelectorAll("strong").length, code: rich.querySelector("pre code.language-python")?.textContent, items: rich.querySelectorAll("li").length },
    evil: { elements: evil.querySelectorAll("script, img, [onerror], [onclick]").length,
            jsLinks: [...evil.querySelectorAll("a")].filter(a => /^javascript:/i.test(a.getAttribute("href") || "")).length,
            text: evil.textContent },
    think: [splitThinking("<think>plan</think>answer"), splitThinking("<think>still thinking"), splitThinking("plain")],
    events,
  };
}
