// Usage: node page.mjs URL KEY SCREENSHOT.png [KEY2]
// Opens the service page in headless Chromium (Debian's, via playwright-core), connects with KEY, checks that
// only the key's sources are offered, clicks Generate, waits for the images and their weights, and writes a
// screenshot. With KEY2 it goes on: an invalid number (the status must say so, no request is sent), switching
// to KEY2 (the first key's images must go), a failed connect (the header must not name a key), and a key in the
// URL's hash (must not be used). Prints one JSON line with what it saw; CSP violations count as errors.
import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, key, shot, key2] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const userDataDir = mkdtempSync(join(tmpdir(), "cdm-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath,
  headless: true,
  viewport: { width: 1100, height: 820 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const errors = [];
const apiCalls = [];
function watch(page) {
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("requestfailed", (r) => errors.push("request failed: " + r.url()));
  page.on("console", (m) => { if (m.type() === "error" && /Content.Security.Policy/i.test(m.text())) errors.push("csp: " + m.text()); });
  page.on("request", (r) => { if (r.url().includes("/v1/")) apiCalls.push(new URL(r.url()).pathname); });
}
const view = (page) => page.evaluate(() => ({
  whoami: document.getElementById("whoami").textContent,
  status: document.getElementById("status").textContent,
  statusClass: document.getElementById("status").className,
  cards: document.querySelectorAll("#results .card").length,
  summaryHidden: document.getElementById("summary").hidden,
  controlsHidden: document.getElementById("controls").hidden,
  sources: [...document.querySelectorAll("#sources input[type=checkbox]")].map((e) => e.value),
  sourceLabels: [...document.querySelectorAll("#sources label")].map((e) => e.textContent),
  weightings: [...document.querySelectorAll("#weighting option")].map((o) => o.value),
}));
try {
  const page = context.pages()[0] || (await context.newPage());
  watch(page);
  await page.goto(url, { waitUntil: "load" });
  await page.fill("#key", key);
  await page.click("#connect");
  await page.waitForSelector("#controls:not([hidden])", { timeout: 20000 });
  const first = await view(page);
  const sources = first.sources;
  await page.fill("#n", "10");
  await page.fill("#seed", "7");
  await page.click("#generate");
  await page.waitForSelector("#results .card img", { timeout: 60000 });
  await page.waitForFunction(() => [...document.querySelectorAll("#results .card img")].every((i) => i.complete && i.naturalWidth > 0));
  const cards = await page.$$eval("#results .card", (cs) => cs.map((c) => ({
    width: c.querySelector("img").naturalWidth,
    weights: [...c.querySelectorAll(".w")].map((w) => [w.querySelector(".name").textContent, parseFloat(w.lastChild.textContent)]),
  })));
  const status = await page.textContent("#status");
  await page.screenshot({ path: shot, fullPage: true });
  const out = { sources, cards, status, errors, weightings: first.weightings, sourceLabels: first.sourceLabels };
  if (key2) {
    // an invalid number: an error in the status line, no request
    const before = apiCalls.length;
    await page.fill("#n", "0");
    await page.click("#generate");
    await page.waitForSelector("#status.error", { timeout: 5000 });
    out.invalid = { ...(await view(page)), requests: apiCalls.length - before };
    await page.fill("#n", "2");
    // switch to key2: the first key's images go
    await page.fill("#key", key2);
    await page.click("#connect");
    await page.waitForFunction(() => document.getElementById("status").textContent === "Connected.", null, { timeout: 20000 });
    out.switched = await view(page);
    // a failed connect: the header names no key, the controls go
    await page.fill("#key", "cdm_" + "x".repeat(43));
    await page.click("#connect");
    await page.waitForSelector("#status.error", { timeout: 20000 });
    out.failed = await view(page);
    // a key in the URL's hash is not used (a new tab: empty sessionStorage)
    const tab = await context.newPage();
    watch(tab);
    const callsBefore = apiCalls.length;
    await tab.goto(url + "#key=" + encodeURIComponent(key), { waitUntil: "load" });
    await tab.waitForTimeout(500);
    out.hashKey = { ...(await view(tab)), requests: apiCalls.length - callsBefore, keyField: await tab.inputValue("#key") };
  }
  console.log(JSON.stringify(out));
} finally {
  await context.close();
}
