// ComfyUI-NPO: the pack's templates in the template browser, simplest first (1, 2, 3, ... 9, 10).
// ComfyUI's server lists example_workflows/*.json in file-system order (an unsorted glob) and the
// frontend shows a pack's cards in the order the server lists them. This wraps the frontend's
// api.getWorkflowTemplates so this pack's list comes sorted by its leading number; other packs'
// lists are left as they are. Nothing else changes; a frontend without that method is left alone.
import { api } from "../../scripts/api.js";

const PACK = (() => {
  // served as /extensions/<the pack's folder>/npo_templates.js; the server keys templates by that folder
  const parts = new URL(import.meta.url).pathname.split("/");
  const at = parts.lastIndexOf("extensions");
  return at >= 0 && parts.length > at + 1 ? decodeURIComponent(parts[at + 1]) : null;
})();

const byNumber = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

export function sortPackTemplates(templates, pack = PACK) {
  if (pack && templates && typeof templates === "object" && Array.isArray(templates[pack])) {
    templates[pack] = [...templates[pack]].sort(byNumber.compare);
  }
  return templates;
}

const original = api?.getWorkflowTemplates;
if (typeof original === "function" && !original.npoSorted) {
  const sorted = async function (...args) {
    return sortPackTemplates(await original.apply(this, args));
  };
  sorted.npoSorted = true;
  api.getWorkflowTemplates = sorted;
}
