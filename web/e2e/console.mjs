// Drives the web console in headless Chromium for tests/web_console_e2e.rs: logs in,
// waits for the embedded guest's banner, pauses and resumes the VM, types "hello" into
// the terminal, waits for the guest's echo, takes a screenshot, clicks Stop and waits for
// the state to change.
//
// Usage: node console.mjs LOGIN_URL SCREENSHOT_PNG USER_DATA_DIR
// Prints one JSON line with what it saw; exits with 1 when a step fails.
import { chromium } from "playwright-core";

const [loginUrl, screenshotPath, userDataDir] = process.argv.slice(2);
if (!loginUrl || !screenshotPath || !userDataDir) {
  console.error("usage: node console.mjs LOGIN_URL SCREENSHOT_PNG USER_DATA_DIR");
  process.exit(2);
}
const STEP_TIMEOUT_MS = 30_000;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

// Without the background-networking flags Chromium opens connections to outside hosts
// at start, which a machine with no outside network refuses.
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 1100, height: 720 },
});
const result = { steps: [] };
const step = (name) => result.steps.push(name);
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  const consoleErrors = [];
  page.on("pageerror", (error) => consoleErrors.push(error.message));

  await page.goto(loginUrl);
  result.url_after_login = page.url();
  step("login");

  const state = page.locator("#vm-state");
  await page.waitForFunction(() => document.getElementById("vm-state").textContent === "running");
  result.name = await page.locator("#vm-name").textContent();
  step("running");

  // xterm.js 5 draws the screen as DOM rows, and the plain-text fallback uses a <pre>.
  const screenText = () =>
    page.evaluate(() => {
      const rows = document.querySelector("#terminal .xterm-rows")
        ?? document.querySelector("#terminal pre");
      return rows ? rows.textContent : "";
    });
  await page.waitForFunction(
    () => (document.querySelector("#terminal .xterm-rows")
      ?? document.querySelector("#terminal pre"))?.textContent.includes("Type to echo"),
  );
  result.xterm = (await page.locator("#terminal .xterm").count()) > 0;
  const before = await screenText();
  result.hello_before_typing = before.includes("hello");
  step("banner");

  const waitForState = (expected) => page.waitForFunction(
    (name) => document.getElementById("vm-state").textContent === name, expected);
  await page.locator("#pause").click();
  await waitForState("paused");
  result.resume_enabled_while_paused = await page.locator("#resume").isEnabled();
  await page.locator("#resume").click();
  await waitForState("running");
  step("pause and resume");

  await page.locator("#terminal").click();
  await page.keyboard.type("hello");
  await page.waitForFunction(
    () => (document.querySelector("#terminal .xterm-rows")
      ?? document.querySelector("#terminal pre"))?.textContent.includes("hello"),
  );
  result.terminal_text = await screenText();
  step("echo");

  // Let one poll show the counters before the screenshot.
  await page.waitForFunction(() => document.getElementById("metrics").textContent.includes("exits"));
  result.metrics_text = await page.locator("#metrics").textContent();
  await page.screenshot({ path: screenshotPath });
  step("screenshot");

  await page.locator("#stop").click();
  await page.waitForFunction(() =>
    ["stopping", "stopped"].includes(document.getElementById("vm-state").textContent));
  result.state_after_stop = await state.textContent();
  await page.waitForFunction(() => document.getElementById("vm-state").textContent === "stopped");
  result.final_state = await state.textContent();
  step("stopped");
  result.page_errors = consoleErrors;
} catch (error) {
  result.error = String(error);
} finally {
  await context.close();
}
console.log(JSON.stringify(result));
process.exit(result.error ? 1 : 0);
