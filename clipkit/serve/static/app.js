"use strict";
// clipkit's search page: plain JS over the /search, /healthz, /thumbnail and /image endpoints.
const $ = (id) => document.getElementById(id);
let info = null;
let under = null;  // a folder the search keeps to ("in this folder" under a result), or null for all
let last = null;  // the last search's { body, label, address }: run again when the folder changes
let asked = 0;  // searches sent: an answer to one that a later one overtook is not shown
const HINT = "Type a description, or drop or paste an image anywhere on the page.";

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
  setStatus(`${total} images indexed. ${HINT}`);
  fromAddress();
}

// The address bar holds the search (?q=TEXT, or ?like=ID for "images like this one", with its options), so
// that a link opens it again and Back / Forward step through the searches. A search by an image file has no
// address: the bar then holds none.
function toAddress(address) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(address || {})) {
    if (value !== undefined && value !== null && value !== false && value !== "") query.set(name, value === true ? "1" : value);
  }
  const target = query.toString() ? "?" + query : location.pathname;
  if (target !== location.search && !(target === location.pathname && !location.search)) history.pushState(null, "", target);
}

function fromAddress() {
  const p = new URLSearchParams(location.search);
  if (p.get("index") && info.indexes[p.get("index")]) $("index-select").value = p.get("index");
  updateRerank();
  if (p.get("k")) $("k").value = p.get("k");
  if (p.get("modality") === "text" && !$("modality-field").hidden) $("modality").value = "text";
  $("rerank").checked = p.get("rerank") === "1";
  showFolder(p.get("under") || null);
  if (p.get("q")) {
    $("query").value = p.get("q");
    searchText(p.get("q"), false);
  } else if (p.get("like")) {
    const id = parseInt(p.get("like"), 10);
    const thumbnail = `thumbnail/${id}` + (indexName() ? `?index=${encodeURIComponent(indexName())}` : "");
    if (Number.isFinite(id)) searchLike(id, `item ${id}`, thumbnail, false);
  } else if (last) {  // (back to before the first search, or to a search by a file, which has no address)
    last = null;
    $("results").replaceChildren();
    $("more").hidden = true;
    $("query-preview").hidden = true;
    setStatus(HINT);
  }
}

function resultsWanted() {
  const k = parseInt($("k").value, 10);
  return Number.isFinite(k) && k > 0 ? Math.min(k, info ? info.limits.max_k : 1000) : 20;
}

function showFolder(folder) {  // the folder searches keep to (null: all), and the line that says so
  under = folder;
  $("folder-field").hidden = !folder;
  $("folder-name").textContent = folder || "";
}

function setFolder(folder) {
  showFolder(folder);
  if (last) search(last.body, last.label, last.address);
}

async function search(body, label, address = null, remember = true) {
  last = { body, label, address };
  if (remember) toAddress(address && { ...address, under: under || undefined });
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
  const ticket = ++asked;
  let response;
  try {
    response = await fetch("search", options);
  } catch (err) {
    if (ticket === asked) setStatus("The server cannot be reached: " + err, true);
    return;
  }
  const data = await response.json().catch(() => ({}));
  if (ticket !== asked) return;
  if (!response.ok) {
    $("more").hidden = true;
    setStatus(data.detail ? String(data.detail) : `Search failed (HTTP ${response.status})`, true);
    return;
  }
  render(data.results);
  label = named(label, body, data.results);
  const wanted = body instanceof FormData ? parseInt(body.get("k"), 10) : body.k;
  $("more").hidden = !(data.results.length >= wanted && wanted < info.limits.max_k);
  const how = data.reranked ? ", re-ranked" : "";
  const what = body instanceof FormData ? body.get("modality") : body.modality;
  const noun = what === "text" ? "captions" : "results";
  setStatus(`${data.results.length} ${noun} for ${label}${where} in ${data.took_ms} ms${how}.`);
}

function named(label, body, results) {  // a restored "images like item ID" (?like=ID): the item's name, once found
  if (body instanceof FormData || body.id === undefined || !label.endsWith(`item ${body.id}`)) return label;
  const self = results.find((hit) => hit.id === body.id && hit.path);
  if (!self) return label;
  const name = self.path.split(/[\\/]/).pop();
  if ($("query-preview").lastChild) $("query-preview").lastChild.textContent = "Images like " + name;
  last.label = label.replace(`item ${body.id}`, name);
  return last.label;
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
      button.addEventListener("click", () => searchLike(hit.id, name, hit.thumbnail_url));
      item.append(button);
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    const label = document.createElement(hit.image_url ? "a" : "span");
    label.className = "name";
    label.textContent = name;
    label.title = hit.path || String(hit.item_id);
    if (hit.image_url) { label.href = hit.image_url; label.target = "_blank"; label.rel = "noopener"; }
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    meta.append(label, score);
    if (hit.caption) {  // (a caption hit's text; an image hit's first caption, where the index holds them)
      const caption = document.createElement("p");
      caption.className = hit.caption_id !== undefined ? "caption" : "caption of-image";
      caption.textContent = hit.caption;
      meta.append(caption);
    }
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
    item.append(meta);
    list.append(item);
  });
}

function searchText(text, remember = true) {
  $("query-preview").hidden = true;
  // ITM re-ranks text -> image and image -> text; text -> text has nothing for it to match
  const rerank = !$("rerank-field").hidden && $("rerank").checked && modality() === "image";
  const body = { text, k: resultsWanted(), rerank, index: indexName(), modality: modality() };
  search(body, `“${text}”`, { q: text, ...addressOptions(), rerank }, remember);
}

function searchLike(id, name, thumbnail, remember = true) {
  const img = document.createElement("img");
  img.src = thumbnail;
  img.alt = name;
  $("query-preview").hidden = false;
  $("query-preview").replaceChildren(img, document.createTextNode("Images like " + name));
  search({ id, k: resultsWanted(), index: indexName(), modality: modality() },
         modality() === "text" ? `captions like ${name}` : `images like ${name}`,
         { like: id, ...addressOptions() }, remember);
}

function addressOptions() {  // (what differs from the page's defaults)
  return { index: $("index-field").hidden ? undefined : indexName(), k: resultsWanted() === 20 ? undefined : resultsWanted(),
           modality: modality() === "text" ? "text" : undefined };
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
  searchText(text);
});
window.addEventListener("popstate", () => { if (info) fromAddress(); });
$("more").addEventListener("click", () => {  // the same search again, for twice as many results
  if (!last) return;
  const before = last.body instanceof FormData ? parseInt(last.body.get("k"), 10) : last.body.k;
  const k = Math.min(before * 2, info.limits.max_k);
  $("k").value = k;
  let body = last.body;
  if (body instanceof FormData) body.set("k", String(k)); else body = { ...body, k };
  search(body, last.label, last.address && { ...last.address, k: k === 20 ? undefined : k });
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
document.addEventListener("paste", (event) => {  // an image pasted (a screenshot, an image copied elsewhere)
  const file = [...(event.clipboardData ? event.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
  if (!file) return;  // (text goes into the search box as usual)
  event.preventDefault();
  searchImageFile(file);
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  $("drop-overlay").hidden = true;
  searchImageFile(event.dataTransfer.files[0]);
});
init();
