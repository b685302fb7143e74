// Headless Chromium check of the MLflow UI (used by tests/test_grid_runs.py, `make test-ui`):
//   node mlflow_runs_page.mjs <runs page url> <parent run page url> <parent run name> <child run name>...
// Opens the runs page EditGrid prints at the end of a grid (a fresh browser: the UI's own default face is GenAI)
// and reports where it landed: the runs table (a row holding the parent run) or MLflow 3's GenAI overview. Then
// expands the parent run's row and reports which child runs are listed, and opens the parent run's page and reports
// its description. Prints one JSON report; exit code 0 when the landing page is the runs table and every child is
// visible, 1 otherwise.
// PLAYWRIGHT_CORE: the path of playwright-core's index.mjs (`make test-ui` installs it under .ui/).
const { chromium } = await import(process.env.PLAYWRIGHT_CORE || 'playwright-core');

const [url, runPageUrl, parentName, ...childNames] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'],
});
const report = { url, parent: parentName, landedOn: null, runsTable: false, genaiOverview: false,
                 parentListed: false, childrenBefore: [], childrenAfter: [], runPageNote: null, error: null };
const bodyText = (page) => page.evaluate(() => document.body.innerText);
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  await page.goto(url, { waitUntil: 'load', timeout: 120000 });
  const parentCell = page.getByText(parentName, { exact: true }).first();
  // Either the runs table with the parent's row, or the GenAI overview ("No data available ...") shows up.
  const overview = page.getByText('No data available', { exact: false }).first();
  await Promise.race([parentCell.waitFor({ timeout: 120000 }), overview.waitFor({ timeout: 120000 })]);
  report.landedOn = page.url();
  const row = page.locator('[role="row"]', { has: parentCell });
  report.runsTable = (await row.count()) > 0 && (await bodyText(page)).includes('Run Name');
  report.genaiOverview = /\/(overview|traces)\b/.test(new URL(page.url()).hash) ||
                         (await bodyText(page)).includes('No data available');
  report.parentListed = await parentCell.isVisible();
  const visible = async () => {
    const text = await bodyText(page);
    return childNames.filter((name) => text.includes(name));
  };
  report.childrenBefore = await visible();
  // The run-name cell of a parent row holds the expand/collapse button of its nested runs.
  await row.locator('button[data-component-id*="runnamecellrenderer"]').first().click();
  for (let i = 0; i < 60 && (await visible()).length < childNames.length; i++) await page.waitForTimeout(500);
  report.childrenAfter = await visible();
  // The parent run's page: its description (the mlflow.note.content tag) says how to compare the trials.
  await page.goto(runPageUrl, { waitUntil: 'load', timeout: 120000 });
  const note = page.getByText('Compare its trials', { exact: false }).first();
  await note.waitFor({ timeout: 60000 }).catch(() => {});
  report.runPageNote = (await note.count()) ? await note.innerText() : null;
} catch (err) {
  report.error = String(err);
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
const ok = report.runsTable && !report.genaiOverview && report.parentListed &&
           report.childrenAfter.length === childNames.length;
process.exit(ok ? 0 : 1);
