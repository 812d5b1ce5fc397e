// This browser's results, kept in localStorage: newest first, at most MAX_ITEMS, and fewer when the
// browser's storage quota is reached (the oldest go first). Rendered with DOM nodes and textContent only.

const STORE = "dcar.gallery.v1";
export const MAX_ITEMS = 24;
const IMAGE_URL = /^data:image\/(png|jpeg|webp);base64,[A-Za-z0-9+/=]+$/;

export function load() {
  try {
    const items = JSON.parse(localStorage.getItem(STORE) || "[]");
    return Array.isArray(items)
      ? items.filter((it) => it && typeof it.image === "string" && IMAGE_URL.test(it.image))
      : [];
  } catch {
    return [];
  }
}

function save(items) {
  // Drop the oldest until the list fits the quota (a few MB: dozens of small PNGs).
  for (let keep = Math.min(items.length, MAX_ITEMS); keep >= 0; keep--) {
    try {
      localStorage.setItem(STORE, JSON.stringify(items.slice(0, keep)));
      return items.slice(0, keep);
    } catch {
      // QuotaExceededError: try with one fewer
    }
  }
  return [];
}

export function add(entry) {
  return save([entry, ...load()]);
}

export function remove(id) {
  return save(load().filter((it) => it.id !== id));
}

export function clear() {
  localStorage.removeItem(STORE);
  return [];
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("aria-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function describe(it) {
  const parts = [it.size, `seed ${it.seed}`];
  if (it.steps != null) parts.push(`${it.steps} steps`);
  if (it.guidance_scale != null) parts.push(`guidance ${it.guidance_scale}`);
  return parts.join(" · ");
}

// actions: {useForEdit(item), reuse(item), remove(item)}
export function render(list, items, actions) {
  list.replaceChildren();
  for (const it of items) {
    const label = `${it.kind === "edit" ? "edit" : "image"}: ${it.prompt}`;
    const when = new Date(it.created).toLocaleString();
    const card = el("li", { className: "card", dataset: { id: it.id } },
      el("img", { src: it.image, alt: label, loading: "lazy", width: 128, height: 128 }),
      el("p", { className: "card-prompt", textContent: it.prompt, title: it.prompt }),
      el("p", { className: "card-params", textContent: `${it.kind} · ${describe(it)}` }),
      el("p", { className: "card-when", textContent: `${it.model || ""} · ${when}` }));
    const buttons = el("div", { className: "card-actions" },
      el("a", { className: "button", href: it.image, download: `dcar-${it.kind}-${it.seed}.png`,
                textContent: "Download", "aria-label": `Download ${label}` }),
      el("button", { type: "button", textContent: "Use as edit input", "aria-label": `Use as edit input: ${label}`,
                     onclick: () => actions.useForEdit(it) }),
      el("button", { type: "button", textContent: "Reuse settings", "aria-label": `Reuse settings of ${label}`,
                     onclick: () => actions.reuse(it) }),
      el("button", { type: "button", className: "quiet", textContent: "Delete", "aria-label": `Delete ${label}`,
                     onclick: () => actions.remove(it) }));
    card.append(buttons);
    list.append(card);
  }
}
