// The cdm service page: plain JS, no build step, no CDN. Talks to /v1/sources and /v1/generate.
// The key is typed (or pasted) into the page and kept in this tab's sessionStorage only; it is never read from
// the URL (a URL ends up in history, logs and Referer headers).
"use strict";
const COLORS = ["#2f6fdf", "#e0603a", "#2aa876", "#9b59b6", "#d4a017", "#16a2b8", "#c2185b", "#6d4c41"];
const WEIGHTING_LABELS = { ito: "ito (training-free)", naive: "naive", single: "single", router: "router",
                           isolated: "isolated", classifier: "classifier" };
const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("cdm-key") || "";
let colorOf = {};
let limits = { max_n: 16, max_steps: 100 };
let epoch = 0;  // bumped on every connect: answers to an earlier key's requests are dropped

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

async function api(path, options = {}) {
  const res = await fetch(path, {
    ...options,
    headers: { "Authorization": "Bearer " + key, "Content-Type": "application/json", ...(options.headers || {}) },
  });
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) {
    let detail = body && body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => (d.loc || []).slice(1).join(".") + ": " + d.msg).join("; ");
    throw new Error(res.status + " " + (detail || res.statusText));
  }
  return body;
}

function clearResults() {
  $("results").replaceChildren();
  $("summary").replaceChildren();
  $("summary").hidden = true;
}

function disconnect() {
  $("whoami").textContent = "";
  $("sources").replaceChildren();
  $("controls").hidden = true;
  colorOf = {};
}

async function connect() {
  epoch += 1;
  const mine = epoch;
  clearResults();  // never show one key's images under another key
  disconnect();
  key = $("key").value.trim();
  if (!key) { sessionStorage.removeItem("cdm-key"); setStatus("Paste an API key first.", true); return; }
  setStatus("Connecting…");
  try {
    const me = await api("/v1/sources");
    if (mine !== epoch) return;
    sessionStorage.setItem("cdm-key", key);
    $("whoami").textContent = "key '" + me.name + "'" + (me.admin ? " (admin)" : "") + ": " + me.sources.length + " source(s)";
    const box = $("sources");
    me.sources.forEach((s, i) => {
      colorOf[s.name] = COLORS[i % COLORS.length];
      const label = document.createElement("label");
      const cb = document.createElement("input");
      cb.type = "checkbox"; cb.value = s.name; cb.checked = s.ready; cb.disabled = !s.ready;
      let text = s.name + " (" + s.n + " samples" + (s.ready ? "" : ", training…") + ")";
      if (s.learned === false) text += " (learnt nothing: equals the backbone)";
      if (s.text) text += " · reads prompts";
      label.append(cb, " ", text);
      label.style.borderLeft = "4px solid " + colorOf[s.name];
      label.style.paddingLeft = "4px";
      box.append(label);
    });
    if (!me.sources.length) box.textContent = "This key may use no source.";
    const sel = $("weighting");
    const previous = sel.value;
    sel.replaceChildren();
    for (const w of me.weightings || []) {
      const o = document.createElement("option");
      o.value = w; o.textContent = WEIGHTING_LABELS[w] || w;
      sel.append(o);
    }
    if ((me.weightings || []).includes(previous)) sel.value = previous;
    if (me.limits) {
      limits = me.limits;
      $("n").max = String(limits.max_n);
      $("steps").max = String(limits.max_steps);
      classMenu(limits.classes || 0);
    }
    $("controls").hidden = false;
    setStatus("Connected.");
  } catch (e) {
    if (mine !== epoch) return;
    sessionStorage.removeItem("cdm-key");
    disconnect();
    setStatus(e.message, true);
  }
}

function weightRow(name, value) {
  const row = document.createElement("div");
  row.className = "w";
  const n = document.createElement("span"); n.className = "name"; n.textContent = name; n.title = name;
  const bar = document.createElement("span"); bar.className = "bar";
  const fill = document.createElement("i");
  fill.style.width = (100 * value).toFixed(1) + "%";
  fill.style.background = colorOf[name] || "#888";
  bar.append(fill);
  const v = document.createElement("span"); v.textContent = value.toFixed(2);
  row.append(n, bar, v);
  return row;
}

// A whole number in [lo, hi] from a number input, or an error message naming the field.
function wholeNumber(id, label, lo, hi) {
  const raw = $(id).value.trim();
  const v = Number(raw);
  if (raw === "" || !Number.isInteger(v) || v < lo || v > hi) {
    return { error: label + " must be a whole number from " + lo + " to " + hi + (raw === "" ? "." : " (got '" + raw + "').") };
  }
  return { value: v };
}

async function generate(ev) {
  ev.preventDefault();
  const sources = [...document.querySelectorAll("#sources input:checked")].map((c) => c.value);
  if (!sources.length) { setStatus("Pick at least one source.", true); return; }
  const fields = { n: wholeNumber("n", "Images", 1, limits.max_n), steps: wholeNumber("steps", "Steps", 1, limits.max_steps),
                   seed: wholeNumber("seed", "Seed", 0, 2147483647) };
  for (const [id, f] of Object.entries(fields)) {
    if (f.error) { setStatus(f.error, true); $(id).focus(); return; }
  }
  const cls = $("class").value;
  const prompt = $("prompt").value.trim();
  const n = fields.n.value;
  const body = {
    sources, n, steps: fields.steps.value, seed: fields.seed.value,
    weighting: $("weighting").value,
    classes: prompt || cls === "uncond" ? null : cls === "all" ? [...Array(limits.classes || 0).keys()] : [parseInt(cls, 10)],
  };
  if (prompt) body.prompt = prompt;  // a caption: text-conditioned compartments draw it
  const mine = epoch;
  $("generate").disabled = true;
  setStatus("Generating " + n + " image(s) from " + sources.join(" + ") + "…");
  const t0 = performance.now();
  try {
    const out = await api("/v1/generate", { method: "POST", body: JSON.stringify(body) });
    if (mine !== epoch) return;  // the key changed meanwhile: not this key's images
    const results = $("results");
    results.replaceChildren();
    for (const img of out.images) {
      const card = document.createElement("div");
      card.className = "card";
      const el = document.createElement("img");
      el.src = "data:image/png;base64," + img.png;
      el.alt = "generated image " + img.index;
      const label = document.createElement("div");
      label.className = "label";
      label.textContent = "#" + img.index + (out.prompt ? " · “" + out.prompt + "”"
        : img.label === null ? " · unconditional" : " · class " + img.label);
      card.append(el, label);
      for (const [name, w] of Object.entries(img.weights)) card.append(weightRow(name, w));
      results.append(card);
    }
    const summary = $("summary");
    summary.replaceChildren();
    const grid = document.createElement("img");
    grid.src = "data:image/png;base64," + out.grid_png; grid.alt = "grid";
    const text = document.createElement("span");
    text.textContent = "compartments: " + out.compartments.map((c) => c.cid + " (" + (c.weights_sha256 || "").slice(0, 12) + ")").join(", ") +
      " · weighting " + out.weighting + " · solver " + out.solver + " · " + out.steps + " steps · seed " + out.seed;
    summary.append(grid, text);
    summary.hidden = false;
    setStatus(out.n + " image(s) in " + ((performance.now() - t0) / 1000).toFixed(2) + " s (server " + out.seconds.toFixed(2) + " s).");
  } catch (e) {
    if (mine === epoch) setStatus(e.message, true);
  } finally {
    $("generate").disabled = false;
  }
}

function classMenu(n) {
  // the backbone's classes, from the server: "all" cycles through them; none: unconditional only
  const sel = $("class");
  const previous = sel.value;
  sel.replaceChildren();
  const add = (value, text) => {
    const o = document.createElement("option"); o.value = value; o.textContent = text; sel.append(o);
  };
  add("uncond", "unconditional");
  if (n > 0) add("all", "all classes (0–" + (n - 1) + ")");
  for (let c = 0; c < n; c++) add(String(c), "class " + c);
  sel.value = [...sel.options].some((o) => o.value === previous) ? previous : (n > 0 ? "all" : "uncond");
}

function init() {
  $("key").value = key;
  $("connect").addEventListener("click", connect);
  $("key").addEventListener("keydown", (e) => { if (e.key === "Enter") connect(); });
  $("controls").addEventListener("submit", generate);
  if (key) connect();
}
init();
