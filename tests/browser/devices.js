#!/usr/bin/env node
// Drives the raw WSGI demo's "your devices" page in Debian's headless chromium with two browser contexts as two
// devices of one user, a phone and a laptop (each its own cookie jar and user agent). Used by tests/test_browser.py.
//
//   node devices.js http://127.0.0.1:8000 [--user=NAME] [--screenshot=FILE]
//
// Both log in; the laptop's page lists both sessions and marks itself; the laptop logs the phone out, and the phone's
// next request shows the login form; the phone logs in again and logs out "everywhere else", which ends the laptop.
// The demo must run with SESSION_CLIENT_DETAILS=1 (each row shows its browser and IP). Prints a JSON result on
// stdout (the handles seen and the session cookies' values, for the caller to compare); on the first failed check
// it prints {"ok": false, "error": ...}, says what failed on stderr (and saves a screenshot to FILE), and exits 1.

"use strict";

const { parseArgs } = require("node:util");
const { TIMEOUT_MS, check, crashed, drive } = require("./harness");

const COOKIE = "session";
// Two devices, told apart by their user agents; the phone's has HTML in it, which must show as text.
const AGENTS = {
  phone: "Mozilla/5.0 (Linux; Android 14) demo-phone <i>Mobile</i>",
  laptop: "Mozilla/5.0 (X11; Linux x86_64) demo-laptop",
};

let lastPage = null; // the page of the last navigation: the one to show when a check fails

function options() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: { user: { type: "string", default: "Zoë" }, screenshot: { type: "string" } },
  });
  if (positionals.length !== 1) throw new Error("usage: node devices.js BASE_URL [--user=NAME] [--screenshot=FILE]");
  return { base: positionals[0].replace(/\/+$/, ""), user: values.user, screenshot: values.screenshot };
}

async function excerpt(page) {
  const text = await page.locator("body").innerText().catch(() => "");
  return JSON.stringify(text.slice(0, 400));
}

/** Navigate (a click, a reload, a visit): the page that results must be ``path`` (a POST before it answered 303). */
async function navigate(page, what, path, action) {
  lastPage = page;
  const [response] = await Promise.all([page.waitForNavigation({ waitUntil: "load" }), action()]);
  check(response !== null, `${what}: no page loaded`);
  for (let request = response.request().redirectedFrom(); request !== null; request = request.redirectedFrom()) {
    const answer = await request.response();
    check(answer.status() === 303, `${what}: ${request.method()} ${new URL(request.url()).pathname} answered ${answer.status()}`);
  }
  const url = new URL(response.url());
  check(
    response.status() === 200 && url.pathname === path,
    `${what}: ${response.request().method()} ${response.url()} answered ${response.status()}, not ${path}: ${await excerpt(page)}`,
  );
  return url;
}

/** Who the home page says is logged in (null: it shows the login form). */
async function loggedInAs(page) {
  const user = page.locator('form[action="/logout"] b');
  const form = await page.locator('form[action="/login"] input[name="username"]').isVisible();
  const name = (await user.count()) ? await user.innerText() : null;
  check((name === null) === form, `the home page shows ${name === null ? "neither" : "both"} a user and a login form`);
  return name;
}

async function logIn(device, base, name, result) {
  const { page } = device;
  await navigate(page, `${device.name}: open /`, "/", () => page.goto(`${base}/`));
  check((await loggedInAs(page)) === null, `${device.name}: / shows no login form: ${await excerpt(page)}`);
  await page.locator('form[action="/login"] input[name="username"]').fill(name);
  await navigate(page, `${device.name}: log in`, "/", () => page.getByRole("button", { name: "Log in", exact: true }).click());
  check((await loggedInAs(page)) === name, `${device.name}: after the login the page says ${await excerpt(page)}`);
  result.cookies.push(await cookieValue(device));
}

/** The devices page as the user sees it: one entry per row. */
async function devicesSeen(page) {
  const rows = [];
  for (const row of await page.locator("tr.device").all()) {
    const handle = row.locator('form[action="/devices/end"] input[name="handle"]');
    rows.push({
      current: (await row.getAttribute("class")).split(/\s+/).includes("current"),
      thisDevice: (await row.innerText()).includes("This device"),
      agent: await row.locator("td.agent").innerText(),
      agentHasMarkup: (await row.locator("td.agent *").count()) > 0,
      ip: await row.locator("td.ip").innerText(),
      handle: (await handle.count()) ? await handle.inputValue() : null,
      button: await row.getByRole("button", { name: "Log out", exact: true }).count(),
    });
  }
  return rows;
}

/** Open the devices page from the home page's link and check what it lists: ``others`` other devices, then this one. */
async function openDevices(device, base, others, result) {
  const { page, name } = device;
  await navigate(page, `${name}: open /`, "/", () => page.goto(`${base}/`));
  await navigate(page, `${name}: click "Your devices"`, "/devices", () => page.getByRole("link", { name: "Your devices" }).click());
  return checkDevices(device, others, result);
}

async function checkDevices(device, others, result) {
  const rows = await devicesSeen(device.page);
  const where = `${device.name}'s devices page`;
  check(rows.length === others.length + 1, `${where} lists ${rows.length} session(s), not ${others.length + 1}: ${JSON.stringify(rows)}`);
  const mine = rows.filter((row) => row.current);
  check(mine.length === 1 && mine[0].thisDevice && mine[0].button === 0, `${where} does not mark one row as this device: ${JSON.stringify(rows)}`);
  check(mine[0].agent === AGENTS[device.name], `${where} shows this device's browser as ${JSON.stringify(mine[0].agent)}`);
  for (const other of others) {
    const row = rows.find((candidate) => !candidate.current && candidate.agent === AGENTS[other]);
    check(row !== undefined, `${where} does not list the ${other} (${AGENTS[other]}): ${JSON.stringify(rows)}`);
    check(row.button === 1 && /^[0-9a-f]{32}$/.test(row.handle), `${where}: the ${other}'s row has no Log out button with a handle`);
  }
  for (const row of rows) {
    check(!row.agentHasMarkup, `${where} rendered the HTML of a user agent: ${JSON.stringify(row.agent)}`);
    check(row.ip === "127.0.0.1", `${where} shows the IP ${JSON.stringify(row.ip)}, not 127.0.0.1`);
  }
  for (const row of rows) if (row.handle) result.handles.push(row.handle);
  return rows;
}

async function cookieValue(device) {
  const cookie = (await device.context.cookies()).find((candidate) => candidate.name === COOKIE);
  return cookie ? cookie.value : null;
}

/** No handle is a session cookie, nor a part of one (its id, its signature). */
function checkHandles(result) {
  for (const handle of result.handles) {
    for (const cookie of result.cookies) {
      check(cookie === null || !cookie.includes(handle), `a handle on the devices page is part of a session cookie: ${handle}`);
    }
  }
}

async function run(opts, browser, result) {
  const { base, user } = opts;
  const devices = {};
  for (const name of ["phone", "laptop"]) {
    const context = await browser.newContext({ userAgent: AGENTS[name] });
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT_MS);
    devices[name] = { name, context, page };
  }
  const { phone, laptop } = devices;
  const step = (name, detail) => result.steps.push(detail === undefined ? name : { [name]: detail });

  await logIn(phone, base, user, result);
  await logIn(laptop, base, user, result);
  step("both logged in");

  let rows = await openDevices(laptop, base, ["phone"], result);
  step("the laptop lists two sessions and marks itself", rows.map((row) => ({ agent: row.agent, current: row.current })));

  const phoneRow = rows.find((row) => !row.current);
  const ended = await navigate(laptop.page, "laptop: log out the phone", "/devices", () =>
    laptop.page.locator("tr.device", { has: laptop.page.locator(`input[value="${phoneRow.handle}"]`) })
      .getByRole("button", { name: "Log out", exact: true }).click(),
  );
  check(ended.searchParams.get("ended") === "1", `logging the phone out ended ${ended.searchParams.get("ended")} session(s)`);
  check(
    (await laptop.page.locator("p.message").innerText()) === "Logged out 1 session(s).",
    `no notice that one session was logged out: ${await excerpt(laptop.page)}`,
  );
  await checkDevices(laptop, [], result);
  step("the laptop logged the phone out");

  await navigate(phone.page, "phone: reload", "/", () => phone.page.reload());
  check((await loggedInAs(phone.page)) === null, `the phone is still logged in after the laptop logged it out: ${await excerpt(phone.page)}`);
  await navigate(phone.page, "phone: open /devices", "/", () => phone.page.goto(`${base}/devices`));
  check((await loggedInAs(phone.page)) === null, "the phone, logged out, still reaches a devices page");
  step("the phone's next request shows the login form");

  await logIn(phone, base, user, result);
  rows = await openDevices(phone, base, ["laptop"], result);
  step("the phone, logged in again, lists two sessions", rows.length);
  const rest = await navigate(phone.page, 'phone: "Log out everywhere else"', "/devices", () =>
    phone.page.getByRole("button", { name: "Log out everywhere else" }).click(),
  );
  check(rest.searchParams.get("ended") === "1", `"Log out everywhere else" ended ${rest.searchParams.get("ended")} session(s), not 1`);
  await checkDevices(phone, [], result);
  step("the phone logged out everywhere else");

  await navigate(laptop.page, "laptop: reload its devices page", "/", () => laptop.page.reload());
  check((await loggedInAs(laptop.page)) === null, `the laptop is still logged in after "Log out everywhere else": ${await excerpt(laptop.page)}`);
  await navigate(phone.page, "phone: open /", "/", () => phone.page.goto(`${base}/`));
  check((await loggedInAs(phone.page)) === user, `the phone lost its own session: ${await excerpt(phone.page)}`);
  step("the laptop's next request shows the login form; the phone stays");

  checkHandles(result);
  step("no handle is part of a session cookie", result.handles.length);
  for (const device of Object.values(devices)) await device.context.close();
}

const opts = options();
const result = { ok: false, url: opts.base, steps: [], handles: [], cookies: [] };
drive(opts.base, opts.screenshot, result, (browser) => run(opts, browser, result), () => lastPage).catch(crashed);
