#!/usr/bin/env node
// Drives one of the demos in examples/ in Debian's headless chromium, as a person would: log in, count,
// reload, log out, then replay the cookie kept from before the logout. Used by tests/test_browser.py.
//
//   node demo.js http://127.0.0.1:8000 [--flash] [--logout-flash] [--cookie=persistent|browser-session]
//                [--max-age=86400] [--cookie-name=session] [--screenshot=FILE]
//
// --flash: the demo shows "Welcome, NAME!" once after the login; --logout-flash: "You are logged out."
// after the logout. --cookie: whether the session cookie carries an expiry (max-age seconds ahead) or
// lasts until the browser closes. Prints a JSON result on stdout; on the first failed check it prints
// {"ok": false, "error": ...}, says what failed on stderr (and saves a screenshot to FILE), and exits 1.

"use strict";

const { parseArgs } = require("node:util");
const { TIMEOUT_MS, check, crashed, drive } = require("./harness");

const NAME = "Zoë"; // typed into the form: a non-ASCII name must come back as typed
const HTML_NAME = "<b>x</b>";

let lastPage = null; // the page to show when a check fails

function options() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      flash: { type: "boolean", default: false },
      "logout-flash": { type: "boolean", default: false },
      cookie: { type: "string", default: "persistent" },
      "max-age": { type: "string", default: "86400" },
      "cookie-name": { type: "string", default: "session" },
      screenshot: { type: "string" },
    },
  });
  if (positionals.length !== 1 || !["persistent", "browser-session"].includes(values.cookie)) {
    throw new Error("usage: node demo.js BASE_URL [--flash] [--logout-flash] [--cookie=persistent|browser-session]");
  }
  return {
    base: positionals[0].replace(/\/+$/, ""),
    flash: values.flash,
    logoutFlash: values["logout-flash"],
    persistent: values.cookie === "persistent",
    maxAge: Number(values["max-age"]),
    cookieName: values["cookie-name"],
    screenshot: values.screenshot,
  };
}

/** The page as a person sees it: who is logged in, the count, the notices, which form is there. */
async function look(page) {
  const user = page.locator('form[action="/logout"] b').first();
  const counter = await page.locator('form[action="/counter"] p').innerText();
  const count = /Count:\s*(\d+)/.exec(counter);
  return {
    user: (await user.count()) ? await user.innerText() : null,
    userHtml: (await user.count()) ? await user.innerHTML() : null,
    loginForm: await page.locator('form[action="/login"] input[name="username"]').isVisible(),
    logoutButton: await page.getByRole("button", { name: "Log out" }).isVisible(),
    count: count ? Number(count[1]) : null,
    notices: await page.locator("p.flash, p.message").allInnerTexts(),
  };
}

async function excerpt(page) {
  const text = await page.locator("body").innerText().catch(() => "");
  return JSON.stringify(text.slice(0, 300));
}

/** Navigate (a click, a reload, a visit) and check the page that results is the demo's home page. */
async function navigate(page, base, what, action) {
  const [response] = await Promise.all([page.waitForNavigation({ waitUntil: "load" }), action()]);
  check(response !== null, `${what}: no page loaded`);
  const post = response.request().redirectedFrom();
  if (post !== null) {
    const answer = await post.response();
    check(answer.status() === 303, `${what}: ${post.method()} ${new URL(post.url()).pathname} answered ${answer.status()}`);
  }
  check(
    response.status() === 200 && response.url() === `${base}/`,
    `${what}: ${response.request().method()} ${response.url()} answered ${response.status()}: ${await excerpt(page)}`,
  );
  return response;
}

/** Fill the login form's visible field and click its button (a hidden CSRF field goes along). */
async function logIn(page, base, name) {
  const field = page.locator('form[action="/login"] input[name="username"]');
  check(await field.isVisible(), `no login form to log in as ${name}: ${await excerpt(page)}`);
  await field.fill(name);
  await navigate(page, base, `log in as ${JSON.stringify(name)}`, () => page.getByRole("button", { name: "Log in" }).click());
}

async function sessionCookie(context, base, name) {
  return (await context.cookies(base)).find((cookie) => cookie.name === name) || null;
}

async function run(opts, browser, result) {
  const { base, cookieName } = opts;
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT_MS);
  lastPage = page;
  const step = (name, detail) => result.steps.push(detail === undefined ? name : { [name]: detail });

  await navigate(page, base, "open /", () => page.goto(`${base}/`));
  let seen = await look(page);
  check(seen.loginForm && !seen.logoutButton && seen.user === null, `/ shows no login form: ${await excerpt(page)}`);
  check(seen.count === 0, `a new visitor's count is ${seen.count}, not 0`);
  const before = await sessionCookie(context, base, cookieName);
  step("login form shown", { sessionCookieBeforeLogin: before !== null });

  await logIn(page, base, NAME);
  seen = await look(page);
  check(seen.user === NAME, `after the login the page says ${JSON.stringify(seen.user)} is logged in, not ${NAME}`);
  check(!seen.loginForm && seen.logoutButton, "after the login the login form is still shown");
  const welcome = `Welcome, ${NAME}!`;
  if (opts.flash) check(seen.notices.includes(welcome), `no "${welcome}" after the login; notices: ${JSON.stringify(seen.notices)}`);
  else check(seen.notices.length === 0, `notices after the login: ${JSON.stringify(seen.notices)}`);
  const loggedIn = await sessionCookie(context, base, cookieName);
  check(loggedIn !== null, `no "${cookieName}" cookie in the browser after the login`);
  check(before === null || before.value !== loggedIn.value, "the login kept the session id of before (session fixation)");
  step("logged in", { user: seen.user, notices: seen.notices });

  for (const expected of [1, 2]) {
    await navigate(page, base, `+1 (${expected})`, () => page.getByRole("button", { name: "+1" }).click());
    seen = await look(page);
    check(seen.count === expected, `after ${expected} click(s) on +1 the count shows ${seen.count}`);
    check(seen.user === NAME, `after +1 the page says ${JSON.stringify(seen.user)} is logged in`);
  }
  check(seen.notices.length === 0, `a notice is shown again: ${JSON.stringify(seen.notices)}`);
  step("counted", seen.count);

  const cookie = await sessionCookie(context, base, cookieName);
  check(cookie !== null, `the "${cookieName}" cookie is gone after counting`);
  check(cookie.httpOnly === true, "the session cookie is not HttpOnly: a script on the page can read it");
  check(cookie.sameSite === "Lax", `the session cookie's SameSite is ${cookie.sameSite}, not Lax`);
  check(cookie.path === "/", `the session cookie's path is ${cookie.path}, not /`);
  check(cookie.secure === false, "the session cookie is Secure on plain http: the browser would not send it back");
  const ahead = cookie.expires - Date.now() / 1000;
  if (opts.persistent) {
    check(Math.abs(ahead - opts.maxAge) < 120, `the session cookie expires in ${Math.round(ahead)} s, not ${opts.maxAge} s`);
  } else {
    check(cookie.expires === -1, `the session cookie expires in ${Math.round(ahead)} s, not when the browser closes`);
  }
  const visible = await page.evaluate(() => document.cookie);
  const names = visible ? visible.split("; ").map((pair) => pair.split("=")[0]) : [];
  check(!names.includes(cookieName), `document.cookie shows the session cookie: ${visible}`);
  result.cookie = {
    name: cookie.name,
    httpOnly: cookie.httpOnly,
    sameSite: cookie.sameSite,
    path: cookie.path,
    secure: cookie.secure,
    expiresIn: cookie.expires === -1 ? null : Math.round(ahead),
  };
  result.scriptCookies = names;
  step("cookie checked", result.cookie);

  await navigate(page, base, "reload", () => page.reload());
  seen = await look(page);
  check(seen.user === NAME && seen.count === 2, `after a reload: ${JSON.stringify(seen)}`);
  check(seen.notices.length === 0, `after a reload a notice is shown again: ${JSON.stringify(seen.notices)}`);
  step("reloaded, still logged in");

  const kept = await sessionCookie(context, base, cookieName); // a copy, as another tab or a thief has it
  await navigate(page, base, "log out", () => page.getByRole("button", { name: "Log out" }).click());
  seen = await look(page);
  check(seen.loginForm && seen.user === null, `after the logout: ${JSON.stringify(seen)}`);
  check(seen.count === 0, `after the logout the count is ${seen.count}, not 0`);
  const bye = "You are logged out.";
  if (opts.logoutFlash) check(seen.notices.includes(bye), `no "${bye}" after the logout; notices: ${JSON.stringify(seen.notices)}`);
  else check(seen.notices.length === 0, `notices after the logout: ${JSON.stringify(seen.notices)}`);
  const after = await sessionCookie(context, base, cookieName);
  check(after === null || after.value !== kept.value, "the logout left the same session cookie in the browser");
  step("logged out", { notices: seen.notices, sessionCookieAfterLogout: after !== null });

  await context.addCookies([kept]);
  const replayed = await sessionCookie(context, base, cookieName);
  check(replayed !== null && replayed.value === kept.value, "could not put the old cookie back into the browser");
  const response = await navigate(page, base, "open / with the old cookie", () => page.goto(`${base}/`));
  const sent = (await response.request().headerValue("cookie")) || "";
  check(sent.includes(`${cookieName}=${kept.value}`), `the browser did not send the old cookie back: ${sent}`);
  seen = await look(page);
  check(seen.user === null && seen.loginForm, `the old cookie, replayed after the logout, logs in as ${JSON.stringify(seen.user)}`);
  const dropped = await sessionCookie(context, base, cookieName);
  step("replayed cookie refused", { cookieKept: dropped !== null && dropped.value === kept.value });

  await logIn(page, base, HTML_NAME);
  seen = await look(page);
  check((await page.locator('form[action="/logout"] b b').count()) === 0, `the name's HTML was rendered: ${seen.userHtml}`);
  check(seen.user === HTML_NAME, `a name with HTML shows as ${JSON.stringify(seen.user)}, not as typed`);
  if (opts.flash) check(seen.notices.includes(`Welcome, ${HTML_NAME}!`), `notices: ${JSON.stringify(seen.notices)}`);
  step("HTML in a name shown as text", seen.userHtml);
  await context.close();
}

const opts = options();
drive(opts.base, opts.screenshot, { ok: false, url: opts.base, steps: [] }, (browser, result) => run(opts, browser, result),
  () => lastPage).catch(crashed);
