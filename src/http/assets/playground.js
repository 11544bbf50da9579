// diffusiond playground: plain script, no dependencies.
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("key");
keyInput.value = localStorage.getItem("diffusiond-key") || "";

function headers(extra) {
  const h = Object.assign({ "Content-Type": "application/json" }, extra || {});
  const key = keyInput.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function say(text, error) {
  $("message").textContent = text;
  $("message").className = error ? "error" : "";
}

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  const body = await r.json();
  if (!r.ok) {
    say(r.status === 401 ? "Enter your API key above (keys mode): " + body.error.message : body.error.message, true);
    return;
  }
  say("Ready.");
  const select = $("model");
  select.innerHTML = "";
  for (const m of body.models) {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = `${m.id} (${m.pipeline}, ${m.credits_per_image} credits)`;
    o.dataset.size = m.default_width;
    select.appendChild(o);
  }
}

async function showCredits() {
  const r = await fetch("/v1/account", { headers: headers() });
  if (!r.ok) { $("credits").textContent = ""; return; }
  const a = await r.json();
  $("credits").textContent = a.auth === "keys" ? `Credits left: ${a.credits}` : "";
}

function figure(src, caption, cls) {
  const f = document.createElement("figure");
  if (cls) f.className = cls;
  const img = document.createElement("img");
  img.src = src;
  img.alt = caption;
  const c = document.createElement("figcaption");
  c.textContent = caption;
  f.append(img, c);
  return f;
}

// Parse a text/event-stream body: calls onEvent(name, data) per event.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

function intOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function generate(ev) {
  ev.preventDefault();
  localStorage.setItem("diffusiond-key", keyInput.value.trim());
  const body = { prompt: $("prompt").value, model: $("model").value, partial_images: 2 };
  for (const f of ["width", "height", "num_images", "seed", "steps"]) {
    const v = intOrNull(f);
    if (v !== null) body[f] = v;
  }
  $("go").disabled = true;
  $("previews").innerHTML = "";
  $("results").innerHTML = "";
  $("bar").value = 0;
  say("Sending...");
  try {
    const r = await fetch("/v1/generate", {
      method: "POST", headers: headers({ Accept: "text/event-stream" }), body: JSON.stringify(body),
    });
    if (!r.ok) {
      const e = await r.json();
      say(`${e.error.code}: ${e.error.message}`, true);
      return;
    }
    window.diffusiondSeen = [];
    window.diffusiondPreviewsShown = [];
    await readEvents(r, (name, data) => {
      window.diffusiondSeen.push(name);
      if (name === "queued") say(`Queued (position ${data.position})...`);
      else if (name === "started") say("Started...");
      else if (name === "step") { $("bar").value = data.step / data.steps; say(`Step ${data.step} of ${data.steps}`); }
      else if (name === "preview") {
        const id = "preview-" + data.index;
        const old = document.getElementById(id);
        const f = figure(`data:image/jpeg;base64,${data.b64_json}`, `image ${data.index}: step ${data.step} of ${data.steps}`, "preview");
        f.id = id;
        // Recorded once drawn (tests read it): image index, step, decoded width.
        const img = f.querySelector("img");
        img.addEventListener("load", () => window.diffusiondPreviewsShown.push([data.index, data.step, img.naturalWidth]));
        if (old) old.replaceWith(f); else $("previews").appendChild(f);
      } else if (name === "completed") {
        $("previews").innerHTML = "";
        $("bar").value = 1;
        say(`Done: ${data.images.length} image(s), ${data.credits_used} credits (${data.request_id})`);
        for (const img of data.images) {
          const f = figure(img.url, `seed ${img.seed} · ${img.width}x${img.height}`, "result");
          $("results").appendChild(f);
        }
      } else if (name === "error") say(`${data.error.code}: ${data.error.message}`, true);
    });
  } catch (e) {
    say("Request failed: " + e, true);
  } finally {
    $("go").disabled = false;
    showCredits();
  }
}

$("form").addEventListener("submit", generate);
keyInput.addEventListener("change", () => { localStorage.setItem("diffusiond-key", keyInput.value.trim()); loadModels(); showCredits(); });
loadModels().then(showCredits);
