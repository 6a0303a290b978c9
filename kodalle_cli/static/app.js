// kodalle serve: the page. Plain JavaScript, no build step; the server is kodalle_cli/serve/.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;      // GET /api/info
let current = null;   // the id of the job this page follows
let events = null;    // its EventSource
let shown = new Set(); // image indices already on the page
let imagePrompt = null; // the uploaded image prompt (POST /api/prompts), or null

async function api(path, options = {}) {
  const init = { ...options, headers: { "Content-Type": "application/json" } };
  return answer(await fetch(path, init));
}

// a response's JSON, or an Error with the server's message
async function answer(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    throw new Error(body && body.error ? body.error : `${response.status} ${response.statusText}`);
  }
  return body;
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

function element(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

// ---- the caption and its tokenizer warnings ---------------------------------------------------
let encodeTimer = null;
let encodeSeq = 0;

function captionChanged() {
  $("chars").textContent = $("caption").value.length;
  clearTimeout(encodeTimer);
  encodeTimer = setTimeout(checkCaption, 250);
}

async function checkCaption() {
  const seq = ++encodeSeq;
  const caption = $("caption").value;
  let result;
  try {
    result = await api("/api/encode", { method: "POST", body: JSON.stringify({ caption }) });
  } catch (error) {
    result = { warnings: [error.message], tokens: 0, text_seq_len: info ? info.text_seq_len : 0 };
  }
  if (seq !== encodeSeq) return; // a newer check is on its way
  const list = $("warning-list");
  list.replaceChildren(...result.warnings.map((w) => element("li", { textContent: w })));
  $("warnings").classList.toggle("has-warnings", result.warnings.length > 0);
  $("no-warnings").textContent = !caption.trim()
    ? "Type a caption to see how the model reads it."
    : result.warnings.length ? "" : "No warnings: every word is known and nothing is cut.";
  $("tokens").textContent = caption.trim()
    ? ` · ${result.tokens} / ${result.text_seq_len} tokens` : "";
}

// ---- the attribute picker (when the run records attributes) -----------------------------------
async function loadAttributes() {
  let data;
  try {
    data = await api("/api/attributes");
  } catch {
    return;
  }
  if (!data.attributes || !data.attributes.length) return;
  const list = $("attribute-list");
  for (const row of data.attributes) {
    const select = element("select", { name: row.key }, [element("option", { value: "", textContent: "—" })]);
    for (const v of row.values) {
      const label = v.count == null ? v.value : `${v.value} (${v.count})`;
      select.append(element("option", { value: v.value, textContent: label }));
    }
    select.addEventListener("change", attributesPicked);
    list.append(element("label", {}, [row.key, select]));
  }
  $("attributes").hidden = false;
}

async function attributesPicked() {
  const picked = {};
  for (const select of $("attribute-list").querySelectorAll("select")) {
    if (select.value) picked[select.name] = select.value;
  }
  if (!Object.keys(picked).length) return;
  try {
    const result = await api("/api/caption", {
      method: "POST", body: JSON.stringify({ attributes: picked }),
    });
    $("caption").value = result.caption;
    showError(null);
    captionChanged();
  } catch (error) {
    showError(error.message);
  }
}

// ---- the image prompt -------------------------------------------------------------------------
async function promptChosen() {
  const file = $("init-image").files[0];
  if (!file) return;
  showError(null);
  let made = null;
  try {
    // the picture's bytes as they are; the server checks the type and size
    made = await answer(await fetch("/api/prompts", {
      method: "POST", headers: { "Content-Type": file.type || "application/octet-stream" }, body: file,
    }));
  } catch (error) {
    showError(`image prompt: ${error.message}`);
    clearPrompt();
    return;
  }
  imagePrompt = made;
  $("prompt-img").src = made.url;
  $("init-rows").max = made.rows - 1;
  if (!$("init-rows").value) $("init-rows").value = made.default_rows;
  $("init-rows").disabled = false;
  $("prompt-rows-of").textContent = `of ${made.rows}`;
  $("prompt-preview").hidden = false;
  $("prompt-clear").hidden = false;
  rowsChanged();
}

function clearPrompt() {
  imagePrompt = null;
  $("init-image").value = "";
  $("init-rows").disabled = true;
  $("init-rows").value = "";
  $("prompt-rows-of").textContent = "";
  $("prompt-preview").hidden = true;
  $("prompt-clear").hidden = true;
}

function rowsChanged() {
  // the part drawn anew is faded over the picture, as in the grid
  if (!imagePrompt) return;
  const rows = Math.min(Math.max(Number($("init-rows").value) || 0, 0), imagePrompt.rows);
  $("prompt-fade").style.height = `${(100 * (imagePrompt.rows - rows)) / imagePrompt.rows}%`;
}

function rankChanged() {
  $("keep-label").hidden = !(info && info.reranker) && !$("rank-perplexity").checked;
}

// ---- generating -------------------------------------------------------------------------------
function readNumber(id) {
  const text = $(id).value.trim();
  if (text === "") return null;
  const value = Number(text);
  return Number.isFinite(value) ? value : text;
}

function request() {
  const body = { caption: $("caption").value };
  for (const name of ["n", "temperature", "cond_scale"]) {
    const value = readNumber(name);
    if (value !== null) body[name] = value; // empty: the server's default
  }
  body.seed = readNumber("seed"); // empty: a random seed (shown when the job starts)
  body.top_k = readNumber("top_k"); // empty: no top-k filter
  if ($("rank-perplexity").checked) body.rank = "perplexity"; // else the reranker, if any
  if (!$("keep-label").hidden) body.keep = readNumber("keep"); // empty: all, ranked
  if (imagePrompt) {
    body.init_image = imagePrompt.id;
    body.init_rows = readNumber("init-rows"); // empty: half the rows
  }
  return body;
}

async function generate(event) {
  event.preventDefault();
  showError(null);
  let job;
  try {
    job = await api("/api/jobs", { method: "POST", body: JSON.stringify(request()) });
  } catch (error) {
    showError(error.message);
    return;
  }
  follow(job);
}

function follow(job) {
  if (events) events.close();
  current = job.id;
  shown = new Set();
  $("results").replaceChildren();
  $("job-warnings").replaceChildren();
  $("job-prompt").hidden = !job.prompt;
  if (job.prompt) {
    $("job-prompt-img").src = job.prompt.url;
    $("job-prompt-caption").textContent =
      `image prompt · top ${job.prompt.rows} of ${job.prompt.of} rows kept`;
  }
  $("grid-download").hidden = true;
  $("folder").textContent = "";
  $("job").hidden = false;
  $("generate").disabled = true;
  $("cancel").hidden = false;
  render(job);
  events = new EventSource(`/api/jobs/${job.id}/events`);
  events.addEventListener("job", (message) => render(JSON.parse(message.data)));
  events.addEventListener("error", async () => {
    // the browser retries a dropped stream itself; a refused one (server restarted, job
    // forgotten) is closed: ask once more, and say what happened
    if (!events || events.readyState !== EventSource.CLOSED) return;
    try {
      render(await api(`/api/jobs/${job.id}`));
    } catch (error) {
      showError(error.message);
      $("generate").disabled = false;
      $("cancel").hidden = true;
    }
  });
}

function figure(image, job) {
  const img = element("img", { src: image.url, alt: `image ${image.index}` });
  img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth < 128));
  const label = image.score != null ? `#${image.rank + 1} · score ${image.score.toFixed(3)}`
    : image.perplexity != null ? `#${image.rank + 1} · perplexity ${image.perplexity.toFixed(2)}`
      : `#${image.index}`;
  const link = element("a", { href: `${image.url}?download`, textContent: "PNG", download: image.name });
  return element("figure", { className: "result" }, [
    img, element("figcaption", {}, [element("span", { textContent: label }), link]),
  ]);
}

function statusText(job) {
  const n = job.settings.n;
  switch (job.state) {
    case "queued":
      return job.position === 1 ? "Waiting: next in the queue"
        : `Waiting in the queue: position ${job.position}`;
    case "running": {
      const percent = Math.floor((100 * job.tokens_done) / Math.max(1, job.tokens_total));
      return `Drawing: ${job.images_done} of ${n} images done (${percent}%) · seed ${job.seed}`;
    }
    case "done": {
      const ranked = !job.ranked_by ? ""
        : ` · best first by ${job.ranked_by === "perplexity" ? "perplexity" : "the reranker"}`;
      return `Done: ${job.images.length} image${job.images.length === 1 ? "" : "s"} in ${job.seconds}s · seed ${job.seed}${ranked}`;
    }
    case "cancelled":
      return "Cancelled";
    default:
      return `Failed: ${job.error}`;
  }
}

function render(job) {
  if (job.id !== current) return;
  $("status").textContent = statusText(job);
  $("status").dataset.state = job.state;
  $("progress").value = job.state === "done" ? 1 : job.tokens_done / Math.max(1, job.tokens_total);
  $("job-warnings").replaceChildren(...job.warnings.map((w) => element("li", { textContent: w })));
  if (job.state === "done") {
    // the final order (best first when reranked), from the output folder
    $("results").replaceChildren(...job.images.map((image) => figure(image, job)));
    const grid = $("grid-download");
    grid.href = `${job.grid_url}?download`;
    grid.download = job.grid_name;
    grid.hidden = false;
    $("folder").textContent = job.folder ? `saved in ${job.folder}` : "";
  } else {
    for (const image of job.images) {
      if (shown.has(image.index)) continue;
      shown.add(image.index);
      $("results").append(figure(image, job));
    }
  }
  if (["done", "error", "cancelled"].includes(job.state)) {
    if (events) events.close();
    events = null;
    $("generate").disabled = false;
    $("cancel").hidden = true;
  }
}

async function cancel() {
  if (!current) return;
  try {
    render(await api(`/api/jobs/${current}`, { method: "DELETE" }));
  } catch (error) {
    showError(error.message);
  }
}

// ---- start ------------------------------------------------------------------------------------
async function start() {
  try {
    info = await api("/api/info");
  } catch (error) {
    showError(`the server does not answer: ${error.message}`);
    return;
  }
  $("checkpoint").textContent = info.checkpoint + (info.reranker ? " · with a reranker" : "");
  for (const name of ["n", "seed", "top_k", "temperature", "cond_scale"]) {
    const value = info.defaults[name];
    $(name).value = value === null || value === undefined ? "" : value;
  }
  $("n").max = info.limits.n[1];
  $("caption").maxLength = info.limits.caption_chars;
  $("max-chars").textContent = info.limits.caption_chars;
  $("init-rows").min = info.limits.init_rows[0];
  $("init-rows").max = info.limits.init_rows[1];
  $("init-image").accept = info.limits.prompt_types.join(",");
  $("init-image").addEventListener("change", promptChosen);
  $("init-rows").addEventListener("input", rowsChanged);
  $("prompt-clear").addEventListener("click", clearPrompt);
  $("rank-perplexity").addEventListener("change", rankChanged);
  rankChanged();
  $("caption").addEventListener("input", captionChanged);
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  if ($("caption").value) captionChanged();
  loadAttributes();
}

start();
