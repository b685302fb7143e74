// A screenshot of a grid's comparison in the MLflow UI (the README's figure):
//   node mlflow_screenshot.mjs <runs page url> <out.png> <parent run name>... [--section <chart section>]
// Opens the runs page EditGrid prints, expands each named grid parent run so its trials are listed, switches the page
// to its chart view (every metric against step = edits applied) and, with --section (e.g. edit: the section of
// edit/efficacy, edit/generalization, ...), scrolls that section of charts to the top.
// PLAYWRIGHT_CORE / CHROMIUM as for mlflow_runs_page.mjs (`make test-ui` installs playwright-core under .ui/).
const { chromium } = await import(process.env.PLAYWRIGHT_CORE || 'playwright-core');

const args = process.argv.slice(2);
const [url, out] = args;
const parents = [];
let section = null;
for (let i = 2; i < args.length; i++) {
  if (args[i] === '--section') section = args[++i]; else parents.push(args[i]);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  await page.goto(url, { waitUntil: 'load', timeout: 120000 });
  for (const name of parents) {
    const cell = page.getByText(name, { exact: true }).first();
    await cell.waitFor({ timeout: 120000 });
    const row = page.locator('[role="row"]', { has: cell });
    await row.locator('button[data-component-id*="runnamecellrenderer"]').first().click();
    await page.waitForTimeout(1500);
  }
  // The assistant panel takes a third of the page; the chart view is the runs-view-mode radio's CHART value.
  const close = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (await close.count()) await close.first().click();
  await page.locator('label', { has: page.locator('input[name="runs-view-mode"][value="CHART"]') }).click();
  await page.waitForTimeout(5000);
  if (section) {
    // A section's header: its name, then the number of its charts in an element of its own.
    const header = page.getByText(section, { exact: true }).first();
    await header.scrollIntoViewIfNeeded();
    await header.evaluate((el) => el.scrollIntoView({ block: 'start' }));
    await page.waitForTimeout(4000);
  }
  await page.screenshot({ path: out, fullPage: false });
  console.log(JSON.stringify({ url: page.url(), out }));
} finally {
  await browser.close();
}
