"""The HTML skeleton, style sheet and script of the report, as strings (no package data, no CDN).

Kept apart from ``report.py`` so that the page logic reads without 300 lines of CSS in between.
"""

from __future__ import annotations

import html

STYLE_CSS = """\
:root {
  --ink: #1c2230; --muted: #5d6679; --line: #e3e6ee; --paper: #ffffff; --bg: #f4f6fa;
  --accent: #2456d6; --accent-soft: #e8eefc; --good: #1b8a4b; --bad: #c0392b;
  --radius: 12px; --shadow: 0 1px 2px rgba(20, 30, 60, .06), 0 4px 14px rgba(20, 30, 60, .06);
}
* { box-sizing: border-box; }
html { scroll-behavior: smooth; }
body {
  margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
.wrap { max-width: 1180px; margin: 0 auto; padding: 0 22px; }
header.top {
  background: linear-gradient(120deg, #14213d 0%, #1f3f8f 55%, #1c7c8c 100%);
  color: #fff; padding: 30px 0 26px; margin-bottom: 26px;
}
header.top h1 { margin: 0 0 6px; font-size: 28px; letter-spacing: -.01em; }
header.top .sub { color: #d6e2ff; font-size: 15px; }
header.top .crumbs { font-size: 14px; margin-bottom: 10px; }
header.top .crumbs a { color: #cfe0ff; }
.stats { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 16px; }
.stat {
  background: rgba(255, 255, 255, .12); border: 1px solid rgba(255, 255, 255, .18);
  border-radius: 10px; padding: 8px 14px; min-width: 110px;
}
.stat b { display: block; font-size: 20px; }
.stat span { font-size: 12px; color: #d6e2ff; text-transform: uppercase; letter-spacing: .04em; }
section.card {
  background: var(--paper); border-radius: var(--radius); box-shadow: var(--shadow);
  padding: 20px 22px; margin: 0 0 22px;
}
section.card > h2 { margin: 0 0 4px; font-size: 20px; }
section.card > p.lead { margin: 0 0 16px; color: var(--muted); }
table.metrics { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
table.metrics th, table.metrics td {
  padding: 8px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap;
}
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics th { font-size: 12px; color: var(--muted); text-transform: uppercase; }
table.metrics td.qpm, table.metrics th.qpm { background: var(--accent-soft); font-weight: 600; }
table.metrics .what {
  text-align: left; white-space: normal; color: var(--muted); font-size: 13px; min-width: 260px;
}
.table-scroll { overflow-x: auto; }
table.conformal th.score { text-align: center; border-left: 1px solid var(--line); }
table.conformal thead tr:first-child th { border-bottom: none; }
.tree-img {
  display: block; max-width: 100%; height: auto; border-radius: 8px; border: 1px solid var(--line);
}
p.calibrated { margin: 10px 0 0; }
.search { display: flex; gap: 12px; align-items: center; margin-bottom: 14px; }
.search input {
  flex: 1; font: inherit; padding: 10px 14px; border-radius: 10px; border: 1px solid #cfd5e3;
  background: #fbfcfe; outline: none;
}
.search input:focus { border-color: var(--accent); box-shadow: 0 0 0 3px var(--accent-soft); }
.search .count { color: var(--muted); font-size: 14px; white-space: nowrap; }
.grid { display: grid; gap: 14px; grid-template-columns: repeat(auto-fill, minmax(165px, 1fr)); }
.class-card {
  display: block; background: #fff; border: 1px solid var(--line); border-radius: 10px;
  overflow: hidden; color: var(--ink); transition: transform .12s, box-shadow .12s;
}
.class-card:hover { transform: translateY(-2px); box-shadow: var(--shadow); text-decoration: none; }
.class-card img {
  display: block; width: 100%; aspect-ratio: 1; object-fit: cover; background: #eef;
}
.class-card .noimg {
  aspect-ratio: 1; display: flex; align-items: center; justify-content: center;
  color: var(--muted); background: #eef1f7; font-size: 13px; padding: 10px; text-align: center;
}
.class-card .name { padding: 8px 10px 2px; font-weight: 600; font-size: 14px; }
.class-card .dots { padding: 0 10px 10px; }
.dot {
  display: inline-block; width: 11px; height: 11px; border-radius: 50%; margin-right: 3px;
  vertical-align: middle; border: 1px solid rgba(0, 0, 0, .15);
}
.chip {
  display: inline-flex; align-items: center; gap: 6px; padding: 3px 10px 3px 8px;
  margin: 2px 4px 2px 0;
  border-radius: 999px; background: #f1f3f8; border: 1px solid var(--line); font-size: 13px;
  color: var(--ink); white-space: nowrap;
}
a.chip:hover { background: var(--accent-soft); text-decoration: none; }
.chip .dot { margin: 0; }
.chip small { color: var(--muted); }
.tiles { display: flex; flex-wrap: wrap; gap: 14px; }
figure.tile {
  margin: 0; width: 176px; background: #fff; border-radius: 10px; overflow: hidden;
  border: 1px solid var(--line); border-top: 5px solid var(--c, #999);
}
figure.tile img { display: block; width: 176px; height: 176px; image-rendering: auto; }
figure.tile figcaption { padding: 6px 9px 8px; font-size: 13px; line-height: 1.35; }
figure.tile figcaption .cap-top {
  display: flex; justify-content: space-between; align-items: center; gap: 6px;
}
figure.tile figcaption .val { font-variant-numeric: tabular-nums; color: var(--muted); }
.ok { color: var(--good); font-weight: 600; }
.wrong { color: var(--bad); font-weight: 600; }
.bars { display: grid; grid-template-columns: minmax(120px, 240px) 1fr 64px; gap: 5px 10px;
  align-items: center; font-size: 13px; }
.bars .track { position: relative; height: 14px; background: #f0f2f7; border-radius: 4px; }
.bars .bar { position: absolute; top: 0; bottom: 0; border-radius: 4px; }
.bars .zero { position: absolute; top: -3px; bottom: -3px; width: 1px; background: #8a93a6; }
.bars .num { text-align: right; font-variant-numeric: tabular-nums; }
.bars .group { grid-column: 1 / -1; font-weight: 600; margin-top: 8px; }
.why {
  background: #fff8e6; border: 1px solid #f2dfa8; border-radius: 10px; padding: 10px 14px;
  margin: 12px 0 4px;
}
.split { display: flex; flex-wrap: wrap; gap: 22px; align-items: flex-start; }
.split > .side { flex: 0 0 auto; }
.split > .main { flex: 1 1 380px; min-width: 300px; }
.pair-list {
  display: grid; gap: 12px; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr));
}
.pair {
  border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; background: #fcfdff;
}
.pair .title { font-weight: 600; }
.pair .meta { color: var(--muted); font-size: 13px; }
.pair-figure { margin: 14px 0 28px; }
.pair-figure img { max-width: 100%; border-radius: 8px; border: 1px solid var(--line); }
.pair-figure h3 { margin: 0 0 4px; }
.muted { color: var(--muted); }
.attrs { margin: 6px 0 0; padding-left: 18px; font-size: 13px; color: var(--muted); }
footer { color: var(--muted); font-size: 13px; padding: 8px 0 40px; text-align: center; }
.hidden { display: none !important; }
.big-img { width: 220px; height: 220px; border-radius: 10px; display: block; }
.caption { font-size: 13px; color: var(--muted); margin-top: 6px; max-width: 220px; }
"""

FILTER_SCRIPT = """\
(function () {
  var input = document.getElementById("class-search");
  var cards = Array.prototype.slice.call(document.querySelectorAll("[data-name]"));
  var count = document.getElementById("class-count");
  function update() {
    var query = input.value.trim().toLowerCase();
    var shown = 0;
    cards.forEach(function (card) {
      var match = query === "" || card.getAttribute("data-name").indexOf(query) !== -1;
      card.classList.toggle("hidden", !match);
      if (match) { shown += 1; }
    });
    count.textContent = shown + " of " + cards.length + " classes";
  }
  input.addEventListener("input", update);
  document.addEventListener("keydown", function (event) {
    if (event.key === "/" && document.activeElement !== input) {
      event.preventDefault();
      input.focus();
    }
  });
  update();
})();
"""


def escape(text: object) -> str:
    """HTML-escape any value's text (quotes included)."""
    return html.escape(str(text), quote=True)


def page(
    *,
    title: str,
    heading: str,
    subtitle: str,
    body: str,
    root: str,
    crumbs: str = "",
    stats: str = "",
    script: str = "",
) -> str:
    """A whole HTML page with the shared header and footer.

    Args:
        title: the browser tab title (plain text).
        heading: the page heading (plain text).
        subtitle: HTML under the heading.
        body: HTML of the page content.
        root: relative path from this page to the report folder ("" or "../").
        crumbs: HTML of the breadcrumb line.
        stats: HTML of the stat boxes under the heading.
        script: inline JavaScript run at the end of the body.
    """
    script_tag = f"<script>\n{script}</script>\n" if script else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{root}style.css">
</head>
<body>
<header class="top"><div class="wrap">
{f'<div class="crumbs">{crumbs}</div>' if crumbs else ""}
<h1>{escape(heading)}</h1>
<div class="sub">{subtitle}</div>
{f'<div class="stats">{stats}</div>' if stats else ""}
</div></header>
<main class="wrap">
{body}
</main>
<footer class="wrap">Made by openqpm. A folder of static files: open it anywhere, no server
or network needed.</footer>
{script_tag}</body>
</html>
"""
