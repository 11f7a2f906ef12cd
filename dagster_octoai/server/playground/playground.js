// The playground page: fills the form from options.json, posts to /generate/{engine}
// with the token typed in (held in this closure only), and shows the images with their
// seeds, or the server's 422 messages under the fields they name. No build step.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("form");
  const fields = ["prompt", "negative_prompt", "size", "num_images", "steps", "cfg_scale",
    "sampler", "seed", "style_preset"];
  let options = null;

  function option(select, value, label) {
    const el = document.createElement("option");
    el.value = value;
    el.textContent = label;
    select.appendChild(el);
  }

  function engineOptions() {
    return options.engines.find((e) => e.name === $("engine").value);
  }

  function fillEngine() {
    const engine = engineOptions();
    const size = $("size");
    size.replaceChildren();
    for (const [w, h] of engine.sizes) option(size, `${w}x${h}`, `${w} × ${h}`);
    size.value = engine.default_size.join("x");
    const preset = $("style_preset");
    preset.replaceChildren();
    option(preset, "", "none");
    for (const name of engine.style_presets) option(preset, name, name);
    // SD 1.5 has no style presets (the API refuses the field there).
    preset.disabled = engine.style_presets.length === 0;
    // FLUX and SD3 refuse samplers (and FLUX negative prompts): not sent there.
    for (const id of ["negative_prompt", "sampler"]) $(id).disabled = engine.refused.includes(id);
    $("steps").value = engine.default_steps;
  }

  async function load() {
    const answer = await fetch("playground/options.json");
    options = await answer.json();
    for (const engine of options.engines) option($("engine"), engine.name, engine.label);
    for (const name of options.samplers) option($("sampler"), name, name);
    $("sampler").value = options.defaults.sampler;
    $("steps").value = options.defaults.steps;
    $("cfg_scale").value = options.defaults.cfg_scale;
    $("num_images").value = options.defaults.num_images;
    fillEngine();
    $("engine").addEventListener("change", fillEngine);
  }

  // A number typed as a number goes as one; anything else goes as typed, so that the
  // server (the one place the API's rules live) says what is wrong with it.
  function value(id) {
    const text = $(id).value.trim();
    if (text === "") return undefined;
    const number = Number(text);
    return Number.isFinite(number) ? number : text;
  }

  function body() {
    const [width, height] = $("size").value.split("x").map(Number);
    const request = { prompt: $("prompt").value, width, height };
    const negative = $("negative_prompt").value.trim();
    if (negative && !$("negative_prompt").disabled) request.negative_prompt = negative;
    for (const id of ["num_images", "steps", "cfg_scale", "seed"]) {
      const v = value(id);
      if (v !== undefined) request[id] = v;
    }
    if (!$("sampler").disabled) request.sampler = $("sampler").value;
    if (!$("style_preset").disabled && $("style_preset").value) {
      request.style_preset = $("style_preset").value;
    }
    return request;
  }

  function clearErrors() {
    for (const el of document.querySelectorAll("[data-error-for]")) el.textContent = "";
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    $("error-form").textContent = "";
  }

  function showError(field, message) {
    const target = $(`error-${field}`) || $("error-form");
    target.textContent = target.textContent ? `${target.textContent} ${message}` : message;
    const input = field === "form" ? null : $(field);
    if (input) input.setAttribute("aria-invalid", "true");
  }

  function showValidation(detail) {
    for (const item of detail) {
      const loc = Array.isArray(item.loc) ? item.loc : [];
      let field = loc[0] === "body" ? loc[1] : loc[0];
      if (field === "width" || field === "height") field = "size";
      if (typeof field !== "string" || !fields.includes(field)) {
        showError("form", item.msg);
      } else {
        showError(field, item.msg);
      }
    }
  }

  function mediaType(b64) {
    return b64.startsWith("iVBOR") ? "image/png" : "image/jpeg";
  }

  function showImages(answer) {
    const box = $("images");
    box.replaceChildren();
    for (const image of answer.images) {
      const figure = document.createElement("figure");
      if (image.removed_for_safety || !image.image_b64) {
        const removed = document.createElement("div");
        removed.className = "removed";
        removed.textContent = "Removed for safety";
        figure.appendChild(removed);
      } else {
        const img = document.createElement("img");
        img.src = `data:${mediaType(image.image_b64)};base64,${image.image_b64}`;
        img.alt = `seed ${image.seed}`;
        figure.appendChild(img);
      }
      const caption = document.createElement("figcaption");
      const seed = document.createElement("span");
      seed.className = "seed";
      seed.textContent = `seed ${image.seed}`;
      const reuse = document.createElement("button");
      reuse.type = "button";
      reuse.textContent = "Use seed";
      reuse.addEventListener("click", () => { $("seed").value = String(image.seed); });
      caption.append(seed, reuse);
      figure.appendChild(caption);
      box.appendChild(figure);
    }
    const count = answer.images.length;
    const ms = Math.round(answer.prediction_time_ms);
    $("status").textContent = `${count} image${count === 1 ? "" : "s"} in ${ms} ms.`;
  }

  async function generate(event) {
    event.preventDefault();
    clearErrors();
    const token = $("token").value.trim();
    if (!token) {
      showError("token", "Enter the API token of this server.");
      return;
    }
    const button = $("generate");
    button.disabled = true;
    $("status").textContent = "Generating…";
    try {
      const answer = await fetch(`generate/${encodeURIComponent($("engine").value)}`, {
        method: "POST",
        headers: { "Content-Type": "application/json", "Authorization": `Bearer ${token}` },
        body: JSON.stringify(body()),
        credentials: "omit",
        cache: "no-store",
      });
      const data = await answer.json().catch(() => ({}));
      if (answer.ok) {
        showImages(data);
        return;
      }
      $("status").textContent = `The server answered ${answer.status}.`;
      if (answer.status === 422 && Array.isArray(data.detail)) {
        showValidation(data.detail);
      } else if (answer.status === 401 || answer.status === 403) {
        showError("token", data.message || "The server refused this token.");
      } else if (answer.status === 429) {
        const wait = answer.headers.get("Retry-After");
        showError("form", `${data.message || "Busy."}${wait ? ` Retry in ${wait} s.` : ""}`);
      } else {
        showError("form", data.message || `Request failed (${answer.status}).`);
      }
    } catch (error) {
      $("status").textContent = "The request did not reach the server.";
      showError("form", String(error));
    } finally {
      button.disabled = false;
    }
  }

  form.addEventListener("submit", generate);
  load().catch((error) => showError("form", `Could not load the page's options: ${error}`));
})();
