// Usage: node page.mjs URL KEY SCREENSHOT.png
// Opens the service page in headless Chromium (Debian's, via playwright-core), connects with KEY, checks that
// only the key's sources are offered, clicks Generate, waits for the images and their weights, and writes a
// screenshot. Prints one JSON line with what it saw.
import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, key, shot] = process.argv.slice(2);
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
try {
  const page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("requestfailed", (r) => errors.push("request failed: " + r.url()));
  await page.goto(url, { waitUntil: "load" });
  await page.fill("#key", key);
  await page.click("#connect");
  await page.waitForSelector("#controls:not([hidden])", { timeout: 20000 });
  const sources = await page.$$eval("#sources input[type=checkbox]", (els) => els.map((e) => e.value));
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
  console.log(JSON.stringify({ sources, cards, status, errors }));
} finally {
  await context.close();
}
