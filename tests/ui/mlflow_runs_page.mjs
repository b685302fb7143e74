// Headless Chromium check of the MLflow UI (used by tests/test_grid_runs.py, `make test-ui`):
//   node mlflow_runs_page.mjs <runs page url> <parent run name> <child run name>...
// Opens the experiment's runs page, expands the parent run's row and prints a JSON report of which child runs
// are then listed. Exit code 0 when every child is visible, 1 otherwise.
// PLAYWRIGHT_CORE: the path of playwright-core's index.mjs (`make test-ui` installs it under .ui/).
const { chromium } = await import(process.env.PLAYWRIGHT_CORE || 'playwright-core');

const [url, parentName, ...childNames] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'],
});
const report = { url, parent: parentName, parentListed: false, childrenBefore: [], childrenAfter: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  await page.goto(url, { waitUntil: 'load', timeout: 120000 });
  const parentCell = page.getByText(parentName, { exact: true }).first();
  await parentCell.waitFor({ timeout: 120000 });
  report.parentListed = true;
  const visible = async () => {
    const text = await page.evaluate(() => document.body.innerText);
    return childNames.filter((name) => text.includes(name));
  };
  report.childrenBefore = await visible();
  // The run-name cell of a parent row holds the expand/collapse button of its nested runs.
  const row = page.locator('[role="row"]', { has: parentCell });
  await row.locator('button[data-component-id*="runnamecellrenderer"]').first().click();
  for (let i = 0; i < 60 && (await visible()).length < childNames.length; i++) await page.waitForTimeout(500);
  report.childrenAfter = await visible();
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
process.exit(report.parentListed && report.childrenAfter.length === childNames.length ? 0 : 1);
