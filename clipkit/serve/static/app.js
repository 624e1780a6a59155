"use strict";
// clipkit's search page: plain JS over the /search, /healthz, /thumbnail and /image endpoints.
const $ = (id) => document.getElementById(id);
let info = null;
let under = null;  // a folder the search keeps to ("in this folder" under a result), or null for all
let last = null;  // the last search's { body, label }: run again when the folder changes

function indexName() { return $("index-select").value || null; }

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function updateRerank() {
  const entry = info && info.indexes[indexName()];
  $("rerank-field").hidden = !(entry && entry.rerank);
  $("modality-field").hidden = !(entry && entry.captions > 0);
  if ($("modality-field").hidden) $("modality").value = "image";
}

function modality() { return $("modality").value; }

async function init() {
  try {
    info = await (await fetch("healthz")).json();
  } catch (err) {
    setStatus("The server cannot be reached: " + err, true);
    return;
  }
  const names = Object.keys(info.indexes);
  for (const name of names) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = `${name} (${info.indexes[name].items} images)`;
    $("index-select").append(option);
  }
  $("index-field").hidden = names.length < 2;
  $("k").max = info.limits.max_k;
  updateRerank();
  const total = names.reduce((sum, n) => sum + info.indexes[n].items, 0);
  setStatus(`${total} images indexed. Type a description, or drop an image anywhere on the page.`);
}

function resultsWanted() {
  const k = parseInt($("k").value, 10);
  return Number.isFinite(k) && k > 0 ? Math.min(k, info ? info.limits.max_k : 1000) : 20;
}

function setFolder(folder) {
  under = folder;
  $("folder-field").hidden = !folder;
  $("folder-name").textContent = folder || "";
  if (last) search(last.body, last.label);
}

async function search(body, label) {
  last = { body, label };
  if (body instanceof FormData) {
    if (under) body.set("under", under); else body.delete("under");
  } else {
    body = { ...body, under: under || undefined };
  }
  const where = under ? ` in ${under}` : "";
  setStatus(`Searching for ${label}${where}…`);
  const options = { method: "POST" };
  if (body instanceof FormData) {
    options.body = body;
  } else {
    options.headers = { "Content-Type": "application/json" };
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch("search", options);
  } catch (err) {
    setStatus("The server cannot be reached: " + err, true);
    return;
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    setStatus(data.detail ? String(data.detail) : `Search failed (HTTP ${response.status})`, true);
    return;
  }
  render(data.results);
  const how = data.reranked ? ", re-ranked" : "";
  const what = body instanceof FormData ? body.get("modality") : body.modality;
  const noun = what === "text" ? "captions" : "results";
  setStatus(`${data.results.length} ${noun} for ${label}${where} in ${data.took_ms} ms${how}.`);
}

function render(results) {
  const list = $("results");
  list.replaceChildren();
  results.forEach((hit, rank) => {
    const item = document.createElement("li");
    const name = hit.path ? hit.path.split(/[\\/]/).pop() : String(hit.item_id);
    if (hit.thumbnail_url) {
      const button = document.createElement("button");
      button.className = "result";
      button.type = "button";
      button.title = "Find images like this one";
      button.setAttribute("aria-label", `Result ${rank + 1}: ${name}, score ${hit.score.toFixed(3)}. Find similar images.`);
      const img = document.createElement("img");
      img.src = hit.thumbnail_url;
      img.alt = hit.caption || name;
      img.loading = "lazy";
      button.append(img);
      button.addEventListener("click", () => {
        $("query-preview").hidden = false;
        $("query-preview").replaceChildren(img.cloneNode(), document.createTextNode("Images like " + name));
        search({ id: hit.id, k: resultsWanted(), index: indexName(), modality: modality() },
               modality() === "text" ? `captions like ${name}` : `images like ${name}`);
      });
      item.append(button);
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    const label = document.createElement(hit.image_url ? "a" : "span");
    label.className = "name";
    label.textContent = name;
    if (hit.image_url) { label.href = hit.image_url; label.target = "_blank"; label.rel = "noopener"; }
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    meta.append(label, score);
    const folder = hit.path ? hit.path.replace(/[\\/][^\\/]*$/, "") : "";
    if (folder && folder !== under) {
      const narrow = document.createElement("button");
      narrow.type = "button";
      narrow.className = "folder small";
      narrow.textContent = "in this folder";
      narrow.title = "Search again, among the images of " + folder + " only";
      narrow.addEventListener("click", () => setFolder(folder));
      meta.append(narrow);
    }
    if (hit.caption_id !== undefined) {
      const caption = document.createElement("p");
      caption.className = "caption";
      caption.textContent = hit.caption;
      meta.append(caption);
    }
    item.append(meta);
    list.append(item);
  });
}

function searchImageFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image.`, true);
    return;
  }
  const url = URL.createObjectURL(file);
  const preview = document.createElement("img");
  preview.src = url;
  preview.alt = "query image";
  $("query-preview").hidden = false;
  $("query-preview").replaceChildren(preview, document.createTextNode("Searching by " + file.name));
  const form = new FormData();
  form.append("image", file);
  form.append("k", String(resultsWanted()));
  form.append("modality", modality());
  if (indexName()) form.append("index", indexName());
  search(form, file.name);
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("query").value.trim();
  if (!text) { setStatus("Type something to search for.", true); return; }
  $("query-preview").hidden = true;
  // ITM re-ranks text -> image and image -> text; text -> text has nothing for it to match
  const rerank = !$("rerank-field").hidden && $("rerank").checked && modality() === "image";
  search({ text, k: resultsWanted(), rerank, index: indexName(), modality: modality() }, `“${text}”`);
});
$("image-input").addEventListener("change", (event) => searchImageFile(event.target.files[0]));
$("image-button").addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("image-input").click(); }
});
$("index-select").addEventListener("change", updateRerank);
$("folder-clear").addEventListener("click", () => setFolder(null));
document.addEventListener("keydown", (event) => {
  if (event.key === "/" && document.activeElement !== $("query")) { event.preventDefault(); $("query").focus(); }
});
let dragDepth = 0;
document.addEventListener("dragenter", (event) => { event.preventDefault(); dragDepth++; $("drop-overlay").hidden = false; });
document.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("drop-overlay").hidden = true; } });
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  $("drop-overlay").hidden = true;
  searchImageFile(event.dataTransfer.files[0]);
});
init();
