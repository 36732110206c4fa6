"""The served ComfyUI frontend in headless Chromium (Chrome DevTools Protocol over a websocket).

Proves, in the real editor: the pack's nodes are registered in LiteGraph; each example workflow loads
from the server's template route without a validation error, a missing-node dialog or a JS exception;
the frontend's own UI→API conversion (``app.graphToPrompt``) equals the converter the HTTP tests use;
and a workflow queued from the page (``app.queuePrompt``) completes on the server.

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install -y chromium``; override the path with
$NPO_E2E_CHROMIUM). Without it this module is skipped with one loud line. The test never installs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
import time
import urllib.parse
from pathlib import Path

import npo_e2ekit as kit
import pytest

try:  # aiohttp comes with ComfyUI's requirements
    import npo_cdp as cdp
except ImportError as e:  # pragma: no cover
    cdp = None
    _IMPORT_ERROR = str(e)

if cdp is None or not Path(os.environ.get("NPO_E2E_CHROMIUM", "/usr/bin/chromium")).is_file():
    _REASON = (f"Chromium not found at {os.environ.get('NPO_E2E_CHROMIUM', '/usr/bin/chromium')} (Debian: apt-get "
               "install -y chromium): browser tests skipped" if cdp is not None else
               f"browser tests skipped: {_IMPORT_ERROR}")
    print(f"\n!!! {_REASON} !!!", file=sys.stderr)
    pytest.skip(_REASON, allow_module_level=True)

EXAMPLES = kit.example_names()
PACK_NODES = ["NPOLoadOffset", "NPOApply", "NPONegativeModel", "NPOCFGGuider", "NPOCompressOffset", "SelfNPOTrain",
              "NPOSaveOffset", "NPOLoadScorer", "NPOCompareReport",
              "NPOScoreImages", "NPOPromptList"]
TEST_VALUES = {"ckpt_name": kit.TINY_CKPT, "offset_name": kit.TINY_OFFSET, "width": 64, "height": 64, "steps": 3}
# Exceptions the frontend itself throws, with no custom node installed (checked with an empty custom_nodes
# folder): ComfyUI v0.3.64's frontend 1.27.10 registers its core settings at start-up, and the
# Comfy.Canvas.NavigationMode setting's onChange sets Comfy.Canvas.LeftMouseClickBehavior before that
# setting exists, so dispatchChange reads `.id` of undefined.
UPSTREAM_EXCEPTIONS = [("Cannot read properties of undefined (reading 'id')", "addSetting")]


# The combo inputs that name a file or folder of the user's: model files (checkpoint, diffusion model, text
# encoder, VAE, NPO offset), a scorer's files in models/npo_scorers (NPO Load Scorer's weights: a file, or a folder
# such as PickScore_v1) and a prompt file in input/. The test server has only its tiny files, so these may hold
# values it does not offer; any other combo value it does not offer is a defect of the example.
FILE_INPUTS = ("ckpt_name", "unet_name", "clip_name", "vae_name", "offset_name", "weights", "prompt_file")


def _names_a_missing_file(node: dict, object_info: dict) -> bool:
    """True when one of the node's file-naming combos (FILE_INPUTS) holds a value the server does not offer;
    an example whose other combo values the server does not offer fails here."""
    info = object_info.get(node["type"])
    if info is None:
        return False
    missing = False
    for name, value in kit.widget_values(node, info).items():
        options = kit.combo_options(*kit.input_spec(info, name))
        if options is not None and value not in options:
            assert name in FILE_INPUTS, f"node {node['id']} ({node['type']}): {name} = {value!r} is not offered"
            missing = True
    return missing


def _is_upstream(exception: str) -> bool:
    return any(message in exception and frame in exception for message, frame in UPSTREAM_EXCEPTIONS)


class BrowserSession:
    """One Chromium + one page on the ComfyUI frontend, driven from synchronous tests on one event loop."""

    def __init__(self, server):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.chromium = cdp.Chromium(log_path=server.base / "chromium.log")
        self.page: cdp.Page | None = None

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def js(self, expression: str, timeout: float = 60.0):
        return self.run(self.page.evaluate(expression, timeout=timeout))

    def start(self) -> None:
        self.chromium.start()
        self.page = self.run(cdp.Page.open(self.chromium.port))
        self.run(self.page.goto(self.server.url + "/"))
        self.run(self.page.wait_for("!!(window.app && app.graph && window.LiteGraph && app.vueAppReady)",
                                    timeout=120))

    def stop(self) -> None:
        try:
            if self.page is not None:
                self.run(self.page.close())
        finally:
            self.chromium.stop()
            self.loop.close()

    def exceptions(self) -> list[str]:
        """Uncaught JS exceptions so far, less the frontend's own start-up bugs (UPSTREAM_EXCEPTIONS)."""
        return [e for e in self.page.exceptions if not _is_upstream(e)]

    def toasts(self) -> list[str]:
        return self.js("Array.from(document.querySelectorAll('.p-toast-message')).map(e => e.innerText)")

    def dialogs(self) -> list[str]:
        return self.js("Array.from(document.querySelectorAll('.p-dialog')).map(e => e.innerText.slice(0, 300))")

    def problems_panel(self) -> str:
        """Newer frontends (1.4x) report missing node types and models in an errors panel instead of a dialog:
        open it ("View details") and return its text ('' when there is no such notice)."""
        return self.js("""(async () => {
            const el = [...document.querySelectorAll('button, a, span')]
                .find(e => e.innerText.trim() === 'View details');
            if (!el || !/\\d+ errors? found/.test(document.body.innerText)) return '';
            el.click();
            await new Promise(r => setTimeout(r, 500));
            return document.body.innerText;
        })()""")

    def close_toasts(self) -> None:
        self.js("document.querySelectorAll('.p-toast-message .p-toast-close-button').forEach(b => b.click()); 0")

    def load_example(self, name: str) -> dict:
        """Load the example from the server's template route; return what the page then holds."""
        url = f"/api/workflow_templates/{kit.PACK_FOLDER}/{urllib.parse.quote(name)}.json"
        return self._load(f"await (await fetch({json.dumps(url)})).json()")

    def load_workflow(self, workflow: dict) -> dict:
        return self._load(json.dumps(workflow))

    def _load(self, source: str) -> dict:
        return self.js(f"""(async () => {{
            const wf = {source};
            await app.loadGraphData(wf);
            await new Promise(r => setTimeout(r, 500));
            const registered = LiteGraph.registered_node_types;
            const nodes = app.graph._nodes.map(n => ({{
                id: n.id, type: n.type, title: n.title, registered: !!registered[n.type],
                has_errors: !!n.has_errors,
                widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value])),
            }}));
            const links = Object.keys(app.graph.links instanceof Map ? Object.fromEntries(app.graph.links)
                                                                      : app.graph.links).length;
            return {{nodes, links}};
        }})()""")

    def close_dialogs(self) -> None:
        self.js("""(async () => {
            document.querySelectorAll('.p-dialog .p-dialog-close-button').forEach(b => b.click());
            await new Promise(r => setTimeout(r, 300));
            return true;
        })()""")


@pytest.fixture(scope="module")
def browser(server):
    session = BrowserSession(server)
    try:
        session.start()
    except Exception:
        session.stop()
        raise
    yield session
    session.stop()


def test_frontend_registers_the_pack_nodes(browser):
    registered = browser.js(f"{json.dumps(PACK_NODES)}.filter(t => !!LiteGraph.registered_node_types[t])")
    assert registered == PACK_NODES
    templates = browser.js("app.api.getWorkflowTemplates()")
    assert sorted(templates.get(kit.PACK_FOLDER, [])) == EXAMPLES, templates
    assert not browser.exceptions(), browser.exceptions()


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_loads_in_the_frontend(browser, object_info, name):
    wf = kit.load_example(name)
    browser.close_toasts()
    state = browser.load_example(name)
    toasts, dialogs = browser.toasts(), browser.dialogs()
    assert not toasts, f"the frontend complained while loading {name}: {toasts}"
    # The one dialog allowed: the missing-models dialog that the loaders' properties.models feed (this test
    # server has none of the real files); it must offer every such file for download.
    # (a loader without properties.models, e.g. Load NPO Offset naming the user's own trained offset in examples
    # 5 and 6, has no download to offer: the dialog does not list it)
    missing_files = [n["widgets_values"][0] for n in wf["nodes"]
                     if _names_a_missing_file(n, object_info) and n["properties"].get("models")]
    for d in dialogs:
        assert "Missing Models" in d and all(f in d for f in missing_files), f"{name}: unexpected dialog {d}"
        assert d.count("Download") >= len(missing_files), d
    browser.close_dialogs()
    assert not browser.exceptions(), browser.exceptions()
    assert [n["type"] for n in state["nodes"]] == [n["type"] for n in wf["nodes"]]
    assert all(n["registered"] for n in state["nodes"]), [n["type"] for n in state["nodes"] if not n["registered"]]
    # Newer frontends flag a loader whose model file is not on this server (the examples name the real
    # checkpoints); any other node with an error is a defect.
    missing_file = {str(n["id"]) for n in wf["nodes"] if _names_a_missing_file(n, object_info)}
    assert {str(n["id"]) for n in state["nodes"] if n["has_errors"]} <= missing_file
    assert state["links"] == len(wf["links"])
    by_id = {str(n["id"]): n for n in state["nodes"]}  # 1.4x frontends keep node ids as strings
    for node in wf["nodes"]:
        if node["type"] == "NPOLoadOffset":
            assert by_id[str(node["id"])]["widgets"]["offset_name"] == node["widgets_values"][0]
        if node.get("title"):
            assert by_id[str(node["id"])]["title"] == node["title"]

    # the frontend's own UI→API conversion agrees with the converter the HTTP tests use
    _assert_same_prompt(browser.js("app.graphToPrompt().then(p => p.output)"), kit.ui_to_api(wf, object_info), name)


def test_a_workflow_saved_with_todays_pack_loads_with_its_values(browser):
    """Every pack node's widget values, saved by the v0.33.0 frontend, read back under the same names here."""
    from test_e2e_widget_contract import saved_workflow

    workflow, expected = saved_workflow()
    browser.close_toasts()
    browser.load_workflow(workflow)
    browser.close_dialogs()
    front = browser.js("app.graphToPrompt().then(p => p.output)")
    _assert_same_prompt(front, expected, "the saved every-pack-node workflow")
    assert not browser.exceptions(), browser.exceptions()


def _numeric_order(names: list[str]) -> list[str]:
    """Template names by their leading number (1, 2, ... 9, 10), the reference for the browser's order."""
    return sorted(names, key=lambda n: (int(re.match(r"\d+", n).group()), n))


def test_template_browser_lists_the_pack_templates_simplest_first(browser):
    """The server lists example_workflows/*.json unsorted; web/npo_templates.js makes the frontend hold them
    in numeric order, and the template browser's pack category shows the cards in that order."""
    pack = kit.PACK_FOLDER
    served = browser.js("fetch('/api/workflow_templates').then(r => r.json())")[pack]
    held = browser.js("app.api.getWorkflowTemplates()")[pack]
    assert sorted(served) == EXAMPLES and held == _numeric_order(served), (served, held)
    # a future "9 ..." and "10 ..." sort by number; another pack's list is left as its server sent it
    fake = {pack: ["10 j", "2 b", "9 i", "1 a"], "other-pack": ["b", "a", "10 x", "9 y"]}
    stubbed = browser.js(f"""(async () => {{
        const real = app.api.fetchApi;
        app.api.fetchApi = async (route, ...rest) => route === "/workflow_templates"
            ? new Response(JSON.stringify({json.dumps(fake)}), {{headers: {{"Content-Type": "application/json"}}}})
            : real.call(app.api, route, ...rest);
        try {{ return await app.api.getWorkflowTemplates(); }} finally {{ app.api.fetchApi = real; }}
    }})()""")
    assert stubbed == {pack: ["1 a", "2 b", "9 i", "10 j"], "other-pack": fake["other-pack"]}
    shown = [line for line in _template_browser_lines(browser, pack) if line in EXAMPLES]
    assert list(dict.fromkeys(shown)) == _numeric_order(EXAMPLES), shown
    assert not browser.exceptions(), browser.exceptions()


def _template_browser_lines(browser, pack: str) -> list[str]:
    """Open the template browser (Templates sidebar / Browse Templates), pick the pack's category, return its
    text lines in document order (the cards' titles among them); the dialog is closed again."""
    try:
        result = browser.js(f"""(async () => {{
            const sleep = ms => new Promise(r => setTimeout(r, ms));
            await app.extensionManager.command.execute("Comfy.BrowseTemplates");
            let entry = null;
            for (let i = 0; i < 80 && !entry; i++) {{
                await sleep(250);
                entry = [...document.querySelectorAll("[role=dialog] *, .p-dialog *")]
                    .find(e => e.children.length === 0 && (e.innerText || "").trim() === {json.dumps(pack)});
            }}
            if (!entry) return {{error: document.body.innerText.slice(0, 1500)}};
            entry.click();
            await sleep(1500);
            const dialog = entry.closest("[role=dialog], .p-dialog");
            return {{lines: dialog.innerText.split("\\n").map(s => s.trim()).filter(Boolean)}};
        }})()""")
    finally:
        _close_the_template_browser(browser)
    assert "lines" in result, f"the template browser shows no {pack} category: {result}"
    return result["lines"]


def _close_the_template_browser(browser) -> None:
    """Escape, then the dialog's own close button (frontend 1.39's template browser has one labelled Close and
    ignores an Escape sent to the document), until no dialog is left."""
    browser.js("""(async () => {
        for (let i = 0; i < 10 && document.querySelector("[role=dialog], .p-dialog"); i++) {
            const dialog = document.querySelector("[role=dialog], .p-dialog");
            for (const target of [document.activeElement, dialog, document]) {
                target && target.dispatchEvent(new KeyboardEvent("keydown", {key: "Escape", bubbles: true}));
            }
            const close = [...dialog.querySelectorAll("button")].find(b =>
                /close/i.test(b.getAttribute("aria-label") || "") || b.classList.contains("p-dialog-close-button")
                || b.querySelector(".pi-times, .icon-\\[lucide--x\\]"));
            if (close) close.click();
            await new Promise(r => setTimeout(r, 300));
        }
        return true;
    })()""")
    browser.close_dialogs()


# Readable: at a canvas scale under ~0.6 the frontend draws nodes without their text (low-quality rendering).
MIN_READABLE_SCALE = 0.75


@pytest.mark.parametrize("name", EXAMPLES)
def test_template_opens_readable(browser, name):
    """Loaded as the template browser loads it (frontend 1.48.7: loadGraphData(wf, true, true, name,
    {openSource: 'template'}), which fits the view to the nodes; 1.27 and 1.39 restore extra.ds), the whole
    graph is on the canvas at scale >= 0.75. Canvas: Chromium's --window-size=1600,1000 (about 1600 x 913)."""
    state = browser.js(f"""(async () => {{
        const name = {json.dumps(name)};
        const url = "/api/workflow_templates/{kit.PACK_FOLDER}/" + encodeURIComponent(name) + ".json";
        const wf = await (await fetch(url)).json();
        await app.loadGraphData(wf, true, true, name, {{openSource: "template"}});
        for (let i = 0; i < 3; i++) await new Promise(r => requestAnimationFrame(r));
        await new Promise(r => setTimeout(r, 300));
        const ds = app.canvas.ds, el = app.canvas.canvas, dpr = window.devicePixelRatio || 1;
        const view = [-ds.offset[0], -ds.offset[1], el.width / dpr / ds.scale, el.height / dpr / ds.scale];
        const off = app.graph._nodes.filter(n => {{
            const [x, y, w, h] = n.boundingRect;
            return x < view[0] || y < view[1] || x + w > view[0] + view[2] || y + h > view[1] + view[3];
        }}).map(n => `${{n.id}} ${{n.type}}`);
        return {{scale: ds.scale, canvas: [el.width / dpr, el.height / dpr], off}};
    }})()""")
    browser.close_dialogs()
    assert state["scale"] >= MIN_READABLE_SCALE, f"{name} opens at {state['scale']:.2f} on a {state['canvas']} canvas"
    assert not state["off"], f"{name}: nodes outside the view at load: {state['off']}"
    assert not browser.exceptions(), browser.exceptions()


@pytest.mark.parametrize("name", [kit.EXAMPLE_SD35, kit.EXAMPLE_WAN21])
def test_an_offset_nobody_released_says_to_train_it_first(browser, name):
    """Templates 5 and 6 name the user's own offset: frontend 1.48.7 lists it as a missing model with
    "Unknown" and no download, beside the loader's title, which says which template trains it; older
    frontends leave it out of the missing-models dialog and show the title on the canvas."""
    template = {kit.EXAMPLE_SD35: "template 4", kit.EXAMPLE_WAN21: "template 7"}[name]
    (load,) = [n for n in kit.load_example(name)["nodes"] if n["type"] == "NPOLoadOffset"]
    offset = load["widgets_values"][0]
    browser.close_toasts()
    try:
        state = browser.load_example(name)
        panel = browser.problems_panel()
        dialogs = browser.dialogs()
    finally:
        browser.close_dialogs()
    (title,) = [n["title"] for n in state["nodes"] if n["type"] == "NPOLoadOffset"]
    assert "train it first" in title and template in title, title
    reports = " ".join([panel, *dialogs, *browser.toasts()])
    assert "Invalid workflow" not in reports, reports
    if panel:  # 1.4x: the missing-model row is file, folder ("Unknown": no properties.models), node title
        row = panel[panel.index(offset):]
        assert row.split("\n")[1:3] == ["Unknown", title], row[:300]
    else:
        assert not any(offset in d for d in dialogs), dialogs  # nothing to download is offered
    assert not browser.exceptions(), browser.exceptions()


def _assert_same_prompt(front: dict, ours: dict, name: str) -> None:
    assert set(front) == set(ours)
    for nid, entry in ours.items():
        assert front[nid]["class_type"] == entry["class_type"]
        assert front[nid]["inputs"] == entry["inputs"], f"{name} node {nid} ({entry['class_type']})"


MUTED_EXAMPLES = [name for name in EXAMPLES
                  if any(n["mode"] == kit.MODE_NEVER for n in kit.load_example(name)["nodes"])]


@pytest.mark.parametrize("name", MUTED_EXAMPLES)
def test_unmuting_a_muted_node_sends_it_and_its_links(browser, object_info, name):
    """A muted node (example 8's second scorer) is left out with the input it feeds; unmuted in the editor (what
    Ctrl+M does), the frontend sends it and its link, as the converter does for the same workflow unmuted."""
    wf = kit.load_example(name)
    muted = {str(n["id"]) for n in wf["nodes"] if n["mode"] == kit.MODE_NEVER}
    browser.load_example(name)
    browser.close_dialogs()
    assert not muted & set(browser.js("app.graphToPrompt().then(p => Object.keys(p.output))"))
    front = browser.js(f"""(async () => {{
        const muted = {json.dumps(sorted(muted))};
        for (const node of app.graph._nodes) if (muted.includes(String(node.id))) node.mode = 0;
        return (await app.graphToPrompt()).output;
    }})()""")
    for n in wf["nodes"]:
        n["mode"] = kit.MODE_ALWAYS
    ours = kit.ui_to_api(wf, object_info)
    assert muted <= set(ours)
    fed = {(str(lk[3]), lk[4]) for lk in wf["links"] if str(lk[1]) in muted}
    nodes = {str(n["id"]): n for n in wf["nodes"]}
    for dst, slot in fed:  # the links from the unmuted nodes arrive
        assert ours[dst]["inputs"][nodes[dst]["inputs"][slot]["name"]][0] in muted
    _assert_same_prompt(front, ours, name)
    assert not browser.exceptions(), browser.exceptions()



@pytest.mark.fault(
    "a workflow with a node type the pack does not have, in the real frontend",
    "the frontend's missing-nodes dialog names it",
)
def test_frontend_reports_a_missing_node(browser):
    """The checks above are not vacuous: an unknown node type opens the missing-nodes dialog."""
    wf = kit.load_example(kit.EXAMPLE_GUIDER)
    (guider,) = [n for n in wf["nodes"] if n["type"] == "NPOCFGGuider"]
    guider["type"] = "NPODoesNotExist"
    try:
        state = browser.load_workflow(wf)
        # a dialog ("Missing Node Types"; 1.27: "Some Nodes Are Missing") or, in 1.4x, the errors panel
        # ("Missing Node Packs")
        reports = browser.dialogs() + [browser.problems_panel()]
        missing = re.compile(r"missing node|nodes are missing")
        assert any(missing.search(d.lower()) and "NPODoesNotExist" in d for d in reports), reports
        assert [n["registered"] for n in state["nodes"] if n["type"] == "NPODoesNotExist"] == [False]
    finally:
        browser.close_dialogs()
    assert not browser.dialogs()


def test_workflow_queued_from_the_frontend_completes(browser, server):
    name = kit.EXAMPLE_KSAMPLER
    browser.load_example(name)
    values = {**TEST_VALUES, "seed": random.randint(1, 2**31)}  # a new seed: nothing comes from the cache
    before = set(kit.get_json(server.url + "/history"))
    changed = browser.js(f"""(() => {{
        const values = {json.dumps(values)};
        let n = 0;
        for (const node of app.graph._nodes)
            for (const w of node.widgets || [])
                if (w.name in values) {{ w.value = values[w.name]; n++; }}
        return n;
    }})()""")
    assert changed >= 6
    browser.js("app.queuePrompt(0, 1).then(() => true)")
    deadline = time.time() + 60  # the POST happens at once; running may take longer (below)
    new = set()
    while time.time() < deadline and not new:
        queue = kit.get_json(server.url + "/queue")
        new = (set(kit.get_json(server.url + "/history")) - before) | {
            item[1] for key in ("queue_running", "queue_pending") for item in queue.get(key, [])}
        time.sleep(0.25)
    assert len(new) == 1, (f"the frontend did not queue exactly one prompt ({new}); dialogs: {browser.dialogs()}, "
                           f"toasts: {browser.toasts()}")
    entry = kit.wait_history(server.url, new.pop(), timeout=300, server=server)
    assert entry["status"]["status_str"] == "success", kit.execution_error(entry)
    names = sorted(r["filename"].rsplit("_", 2)[0] for r in kit.output_images(entry))
    assert names == ["npo_off", "npo_on"], kit.output_images(entry)
    assert not browser.exceptions(), browser.exceptions()
