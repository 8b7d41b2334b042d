"""Looks at every built page in a headless browser, as a reader at 1280 px would.

    make docs && python docs/check_pages.py [docs/_build/html] [--shots DIR]

Reports, per page: code blocks whose lines are cut off (the block scrolls
sideways), tables wider than the text column (columns cut off), markdown
table pipes printed as text, and internal names (test names, test files,
"CI") in the text outside code. Exits 1 if any page has one. Needs Chromium
(``/usr/bin/chromium``, or ``CHROMIUM=path``) and the ``playwright`` package;
neither is a dependency of the library.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

WIDTH, HEIGHT = 1280, 900

PROBE = r"""() => {
  const out = [];
  const main = document.querySelector('article') || document.body;
  for (const pre of main.querySelectorAll('pre')) {
    if (pre.scrollWidth > pre.clientWidth + 1) {
      const line = pre.innerText.split('\n').reduce((a, b) => (b.length > a.length ? b : a), '');
      out.push(['cut-off code', line.slice(0, 100)]);
    }
  }
  for (const table of main.querySelectorAll('table')) {
    const box = table.parentElement;
    const room = Math.min(box.clientWidth, main.clientWidth);
    if (table.scrollWidth > room + 1 || box.scrollWidth > box.clientWidth + 1) {
      const head = table.querySelector('tr');
      out.push(['table wider than the page', head ? head.innerText.replace(/\s+/g, ' ').slice(0, 100) : '']);
    }
  }
  const clone = main.cloneNode(true);
  for (const code of clone.querySelectorAll('pre, .highlight, script, style')) code.remove();
  const text = clone.innerText;
  for (const line of text.split('\n')) {
    if (/^\s*\|(.*\|){2,}\s*$/.test(line) || /\|\s*-{3,}\s*\|/.test(line)) out.push(['raw table pipes', line.slice(0, 100)]);
    const m = line.match(/\btest_[a-z0-9_]+|\btests\/[\w\/.]*|\bCI\b/);
    if (m) out.push(['internal name', m[0] + ' in: ' + line.slice(0, 100)]);
  }
  return out;
}"""


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('html', nargs='?', default='docs/_build/html')
  ap.add_argument('--shots', default=None, help='also save a full-page screenshot of each page here')
  args = ap.parse_args(argv)
  from playwright.sync_api import sync_playwright

  root = pathlib.Path(args.html).resolve()
  pages = sorted(p for p in root.rglob('*.html')
                 if not any(part in ('_static', '_sources', '_modules', '_images')
                            or part.startswith('.') for part in p.relative_to(root).parts[:-1])
                 and p.name not in ('genindex.html', 'search.html', 'py-modindex.html'))
  problems = 0
  with sync_playwright() as pw:
    browser = pw.chromium.launch(
        executable_path=os.environ.get('CHROMIUM', '/usr/bin/chromium'),
        args=['--no-sandbox', '--disable-gpu', '--disable-background-networking',
              '--disable-component-update', '--disable-sync', '--no-first-run'])
    page = browser.new_page(viewport={'width': WIDTH, 'height': HEIGHT})
    for path in pages:
      page.goto(path.as_uri())
      page.wait_for_load_state('load')
      found = page.evaluate(PROBE)
      name = str(path.relative_to(root))
      for kind, what in found:
        print(f'{name}: {kind}: {what}')
      problems += len(found)
      if args.shots:
        shot = pathlib.Path(args.shots) / (name.replace('/', '_') + '.png')
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
    browser.close()
  print(f'{len(pages)} pages at {WIDTH} px: {problems} problem(s)')
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main())
