// What the browser scripts share: Debian's chromium, the checks, and the run that prints a JSON result.
"use strict";

const { chromium } = require("playwright-core");

const CHROMIUM = "/usr/bin/chromium";
const TIMEOUT_MS = 5000;

class CheckFailed extends Error {}

function check(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

// Launch chromium, await run(browser, result), and print result as JSON on stdout. On the first failed check
// (or an error), result gets ok: false and the error, stderr says what failed, a screenshot of shownPage()
// is saved to screenshot (if given) and the exit code is 1; a crash of the harness itself exits 2.
async function drive(base, screenshot, result, run, shownPage) {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  result.browser = browser.version();
  try {
    await run(browser, result);
    result.ok = true;
  } catch (error) {
    result.error = error instanceof CheckFailed ? error.message : String(error.stack || error);
    const page = shownPage();
    if (screenshot && page) {
      await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
      result.screenshot = screenshot;
    }
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(result) + "\n");
  if (!result.ok) {
    process.stderr.write(`${base}: failed after ${result.steps.length} step(s): ${result.error}\n`);
    process.exitCode = 1;
  }
}

function crashed(error) {
  process.stderr.write(`${error.stack || error}\n`);
  process.exitCode = 2;
}

module.exports = { TIMEOUT_MS, CheckFailed, check, drive, crashed };
