"""A page's HTML as the fast tests read it: its title and the URLs it loads."""

from __future__ import annotations

from html.parser import HTMLParser


class Page(HTMLParser):
    """A page's title, the URLs its elements load (`src`, `href`), and what a strict
    Content-Security-Policy would block: inline scripts, `on…` handlers, inline styles."""

    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_title = tag == "title"
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]
        names = {name for name, _ in attrs}
        if tag in ("script", "style") and "src" not in names:
            self.inline.append(f"<{tag}>")
        self.inline += [f"{tag} {name}=" for name in names if name.startswith("on")]
        self.inline += [f"{tag} style=" for name in names if name == "style"]

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False


def parse_html(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page
