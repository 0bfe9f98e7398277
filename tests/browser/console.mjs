// Drives the kubetx console in Debian's chromium with playwright-core. Started by
// tests/console_browser.rs, which runs kubetx, fills its store and passes in:
//   KUBETX_URL (the API's base URL), KUBETX_TOKEN, KUBETX_EXPECT (a JSON file of what the store
//   holds), KUBETX_ARTIFACTS (where screenshots go), KUBETX_CHROMIUM (the browser binary).
// Exits non-zero with a message on the first failed check.
import { chromium } from "playwright-core";
import { readFileSync, mkdirSync } from "node:fs";
import assert from "node:assert/strict";

const base = process.env.KUBETX_URL;
const token = process.env.KUBETX_TOKEN;
const expect = JSON.parse(readFileSync(process.env.KUBETX_EXPECT, "utf8"));
const artifacts = process.env.KUBETX_ARTIFACTS;
mkdirSync(artifacts, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.KUBETX_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--headless=new"],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
const page = await context.newPage();
page.setDefaultTimeout(15000);
const dataAnswers = [];
page.on("response", (r) => {
  if (r.url().includes("/api/admin/") && r.status() === 200) dataAnswers.push(r.url());
});
const shot = (name) => page.screenshot({ path: `${artifacts}/${name}.png`, fullPage: true });
const step = (text) => console.log("step:", text);

async function rowGids() {
  return page.locator("#list-table tbody tr td:first-child").allTextContents();
}

async function waitRows() {
  await page.waitForFunction(() => /shown, page/.test(document.getElementById("status").textContent));
}

/** Runs `action` and waits for the list it loads: the status line is emptied first, so that the
 * previous list's "shown, page" (or a fetch still in flight) is never taken for the new one. */
async function reload(action) {
  await page.evaluate(() => { document.getElementById("status").textContent = ""; });
  await action();
  await waitRows();
}

async function applyFilters(filters) {
  await reload(() => page.getByRole("button", { name: "Clear" }).click());
  await page.getByLabel("Status").selectOption(filters.status || "");
  await page.getByLabel("Mode").selectOption(filters.mode || "");
  await page.getByLabel("Gid starts with").fill(filters.gid || "");
  await reload(() => page.getByRole("button", { name: "Apply" }).click());
}

/** Every gid of the current list, following "Next page" to the end. */
async function allPages() {
  const seen = [];
  for (let i = 0; i < 100; i++) {
    seen.push(...(await rowGids()));
    const next = page.getByRole("button", { name: "Next page" });
    if (await next.isDisabled()) return seen;
    await reload(() => next.click());
  }
  throw new Error("paging does not end");
}

async function confirmDialog() {
  const dialog = page.getByRole("dialog");
  await dialog.waitFor();
  // Keyboard: the dialog opens on Cancel; Tab moves to Confirm, Enter presses it.
  await page.keyboard.press("Tab");
  await page.keyboard.press("Enter");
  await dialog.waitFor({ state: "hidden" });
}

async function statusOf() {
  return (await page.locator("#global dt:text-is('status') + dd").textContent()).trim();
}

async function refreshUntil(predicate, what) {
  const deadline = Date.now() + 20000;
  while (Date.now() < deadline) {
    await page.getByRole("button", { name: "Refresh" }).click();
    await page.waitForLoadState("networkidle");
    if (await predicate()) return;
  }
  throw new Error(`timed out waiting for ${what}`);
}

try {
  step("without a token: the login, no data");
  await page.goto(base + "/");
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  assert.equal(await page.locator("#list").isVisible(), false);
  assert.equal(await page.locator("#list-table tbody tr").count(), 0);
  assert.deepEqual(dataAnswers, [], "no data route answered");
  assert.ok(!(await page.content()).includes(expect.stuck_gid));
  await shot("01-login");

  step("a wrong token is refused");
  await page.getByLabel("API token").fill("not-the-token");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByText("The token was refused.").waitFor();
  assert.deepEqual(dataAnswers, []);

  step("the right token: the list, newest first");
  await page.getByLabel("API token").fill(token);
  await page.keyboard.press("Enter");
  await waitRows();
  const first = await rowGids();
  assert.equal(first.length, 50);
  assert.equal(first[0], expect.newest_gid);
  assert.match(await page.locator("#summary").textContent(), /Unfinished: \d+ prepared/);
  await shot("02-list");

  step("filters: status and mode");
  await applyFilters({ status: "failed", mode: "saga" });
  const failedSagas = await allPages();
  assert.equal(failedSagas.length, expect.failed_sagas);
  for (const s of await page.locator("#list-table tbody tr td:nth-child(3)").allTextContents()) assert.equal(s, "failed");
  await shot("03-filtered-failed-sagas");

  step("filters: mode, paged to the end, each once");
  await applyFilters({ mode: "msg" });
  const msgs = await allPages();
  assert.equal(msgs.length, expect.msgs);
  assert.equal(new Set(msgs).size, msgs.length);
  assert.ok(msgs.every((g) => g.startsWith("msg-")));

  step("filters: gid prefix");
  await applyFilters({ gid: "tcc-abort-" });
  const aborted = await allPages();
  assert.equal(aborted.length, expect.tcc_aborted);

  step("the unfinished view, oldest due first");
  await reload(() => page.getByRole("link", { name: "Unfinished, oldest due first" }).click());
  await page.getByRole("heading", { name: "Unfinished transactions, oldest due first" }).waitFor();
  assert.equal(await page.getByLabel("Status").isVisible(), false, "no filters on this view");
  const due = await rowGids();
  assert.equal(due[0], expect.oldest_due_gid);
  await shot("04-unfinished");

  step("the detail of a stuck saga, opened with the keyboard");
  await page.goto(`${base}/#/`);
  await applyFilters({ gid: expect.retry_gid });
  await page.getByRole("link", { name: expect.retry_gid }).focus();
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: `Transaction ${expect.retry_gid}` }).waitFor();
  const ops = await page.locator("#branches tbody tr").evaluateAll((rows) =>
    rows.map((r) => [r.cells[0].textContent, r.cells[1].textContent]));
  assert.deepEqual(ops, [["01", "compensate"], ["01", "action"], ["02", "compensate"], ["02", "action"]]);
  assert.equal(await statusOf(), "submitted");
  const lastError = await page.locator("#branches tbody tr:nth-child(4) td:nth-child(5)").textContent();
  assert.match(lastError, /500/);
  assert.ok(!(await page.content()).includes(expect.secret), "the header secret is not shown");
  await page.getByText("Raw JSON").click();
  assert.match(await page.locator("#raw-json").textContent(), new RegExp(`"gid": "${expect.retry_gid}"`));
  await shot("05-detail-stuck");

  step("retry now: the stuck saga succeeds");
  await page.getByRole("button", { name: "Retry now" }).click();
  await confirmDialog();
  await refreshUntil(async () => (await statusOf()) === "succeed", "the retried saga to succeed");
  await shot("06-detail-retried");

  step("force stop, then retry compensation");
  await page.goto(`${base}/#/tx/${encodeURIComponent(expect.stop_gid)}`);
  await page.getByRole("heading", { name: `Transaction ${expect.stop_gid}` }).waitFor();
  assert.equal(await statusOf(), "submitted");
  assert.equal(await page.getByRole("button", { name: "Retry compensation" }).isVisible(), false);
  await page.getByRole("button", { name: "Force stop" }).click();
  await confirmDialog();
  await page.waitForFunction(() => /Force stop: done/.test(document.getElementById("status").textContent));
  assert.equal(await statusOf(), "failed");
  await shot("07-force-stopped");
  await page.getByRole("button", { name: "Retry compensation" }).click();
  await confirmDialog();
  await refreshUntil(async () => {
    const s = await page.locator("#branches tbody tr td:nth-child(3)").allTextContents();
    return (await statusOf()) === "failed" && s[0] === "succeed" && s[2] === "succeed";
  }, "the compensations to succeed");
  await shot("08-compensated");

  step("an operator resource: its namespace/name and phase");
  await page.goto(`${base}/#/tx/${encodeURIComponent(expect.resource_gid)}`);
  await page.getByRole("heading", { name: `Transaction ${expect.resource_gid}` }).waitFor();
  const resource = await page.locator("#global dt:text-is('Kubernetes resource') + dd").textContent();
  assert.match(resource, /^Saga default\/transfer-1, phase Succeeded \(kubectl -n default get saga transfer-1\)$/);
  await shot("09-operator-resource");

  step("accessibility: landmarks, labels, sign out");
  for (const role of ["banner", "main", "navigation"]) assert.ok(await page.getByRole(role).count() >= 1, role);
  const unlabelled = await page.evaluate(() =>
    [...document.querySelectorAll("input, select")].filter((e) => !e.labels || e.labels.length === 0).map((e) => e.id));
  assert.deepEqual(unlabelled, []);
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem("kubetx.token")), null);
  console.log("console checks passed");
} catch (error) {
  await shot("failure").catch(() => {});
  console.error(error);
  process.exitCode = 1;
} finally {
  await browser.close();
}
