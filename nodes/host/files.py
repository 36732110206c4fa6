"""Where the pack reads and writes files: the ``npo`` model folder, offset names, save paths.

Names given by the user stay inside their folder (no ``..``, no absolute paths); a file reached through
a symlink in a model folder loads, as with ComfyUI's own loaders.
"""

from __future__ import annotations

import json
import os

import folder_paths

from ...npo_core.errors import NPOError

NPO_FOLDER = "npo"


def register_npo_folder() -> None:
    """Register ``models/npo`` (created if missing) through ComfyUI's folder API as the first ``npo`` folder,
    where Save NPO Offset writes, as ComfyUI's own model folders come before those of extra_model_paths.yaml.
    Folders the yaml gave ``npo`` before the pack loaded are kept after it, and get ComfyUI's checkpoint
    extensions (``add_model_folder_path`` makes a folder with none). Done once per process."""
    global _registered
    default = os.path.join(folder_paths.models_dir, NPO_FOLDER)
    known = folder_paths.folder_names_and_paths.get(NPO_FOLDER)
    if known is None or (not _registered and not known[1]):
        folder_paths.add_model_folder_path(NPO_FOLDER, default, is_default=True)
    _registered = True
    paths, exts = folder_paths.folder_names_and_paths[NPO_FOLDER]
    if not exts:
        exts.update(folder_paths.supported_pt_extensions)
    if default in paths:
        os.makedirs(default, exist_ok=True)


_registered = False


LORAS_MARK = "[loras] "


def offset_file_list() -> list[str]:
    """Files of ``models/npo`` first, then those of ``models/loras``, marked ``[loras] name``."""
    register_npo_folder()
    return list(folder_paths.get_filename_list(NPO_FOLDER)) + [
        LORAS_MARK + n for n in folder_paths.get_filename_list("loras")
    ]


def from_loras_folder(name: str) -> bool:
    return name.startswith(LORAS_MARK)


def check_relative_name(name: str, input_name: str) -> None:
    """Refuse names that could leave their folder: absolute paths, drive letters, '..' parts."""
    if _leaves_folder(name):
        raise NPOError(
            f"{input_name}: '{name}' must be a file name inside its folder (no '..', no absolute path); "
            "put the file into the folder instead."
        )


def _leaves_folder(name: str) -> bool:
    """An absolute path, a drive letter or a '..' part."""
    parts = name.replace("\\", "/").split("/")
    return os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath((path, folder)) == folder
    except ValueError:  # other drive (Windows)
        return False


def offset_file_path(name: str) -> str:
    """The file behind an ``offset_file_list`` entry; a plain name (workflows saved before the loras entries
    were marked) is looked up in models/npo, then models/loras."""
    register_npo_folder()
    folders = ("loras",) if from_loras_folder(name) else (NPO_FOLDER, "loras")
    name = name.removeprefix(LORAS_MARK)
    check_relative_name(name, "offset_name")
    for folder in folders:
        path = folder_paths.get_full_path(folder, name)
        if path:
            return path
    raise NPOError(
        f"offset_name: '{name}' is in neither models/npo nor models/loras. Put the file there and "
        "refresh (press R in the browser)."
    )


def output_dir() -> str:
    return folder_paths.get_output_directory()


def npo_dir() -> str:
    register_npo_folder()
    return folder_paths.get_folder_paths(NPO_FOLDER)[0]


def check_prefix(filename_prefix: str, input_name: str = "filename_prefix") -> None:
    """Refuse a save prefix that is empty or could leave its folder (absolute, drive letter, '..' parts)."""
    if not str(filename_prefix).strip():
        raise NPOError(f"{input_name}: empty; write a file name such as 'self_npo' (subfolders with '/').")
    name = str(filename_prefix)
    if _leaves_folder(name):
        raise NPOError(
            f"{input_name}: '{name}' must be a relative name without '..' (files are written inside their "
            "output folder)."
        )


def save_path(base_dir: str, filename_prefix: str, input_name: str = "filename_prefix") -> tuple[str, str, int]:
    """(folder, base filename, next counter) inside ``base_dir``; refuses prefixes that leave it."""
    check_prefix(filename_prefix, input_name)
    try:
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, base_dir)
    except Exception as e:
        raise NPOError(f"{input_name}: '{filename_prefix}' is not allowed ({e}).") from None
    if not _inside(os.path.realpath(folder), os.path.realpath(base_dir)):
        raise NPOError(
            f"{input_name}: '{filename_prefix}' points outside {base_dir} (a symlink?); choose another name."
        )
    return folder, filename, counter


PROVENANCE_KEYS = ("prompt", "workflow")


def provenance(prompt, extra_pnginfo) -> dict[str, str]:
    """What ComfyUI's own checkpoint and LoRA savers write into a file's metadata: the prompt and each
    extra_pnginfo entry (the workflow) as JSON; nothing under ``--disable-metadata``."""
    from comfy.cli_args import args

    if args.disable_metadata:
        return {}
    meta = {} if prompt is None else {"prompt": json.dumps(prompt)}
    for key, value in (extra_pnginfo or {}).items():
        meta[str(key)] = json.dumps(value)
    return meta


def input_files(suffix: str) -> list[str]:
    """The files of ComfyUI's input folder ending in ``suffix`` (subfolders included), relative with '/'."""
    root = folder_paths.get_input_directory()
    out = []
    for here, _dirs, found in os.walk(root, followlinks=True):
        rel = os.path.relpath(here, root)
        out += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in found if f.endswith(suffix)]
    return sorted(out)


def input_text_files() -> list[str]:
    """The .txt files of ComfyUI's input folder (subfolders included), relative with '/'."""
    return input_files(".txt")


def input_file_path(name: str, input_name: str) -> str:
    """A file of ComfyUI's input folder (a relative name without '..'); missing is an error naming the input."""
    check_relative_name(name, input_name)
    path = os.path.join(folder_paths.get_input_directory(), name)
    if not os.path.isfile(path):
        raise NPOError(f"{input_name}: '{name}' is not in ComfyUI's input folder.")
    return path


def read_input_text(name: str, input_name: str) -> str:
    """A text file of ComfyUI's input folder (UTF-8)."""
    with open(input_file_path(name, input_name), encoding="utf-8") as f:
        return f.read()


def input_subfolder(name: str, input_name: str) -> str:
    """A folder inside ComfyUI's input folder (a relative name without '..'); missing is an error naming it."""
    check_relative_name(name, input_name)
    path = os.path.join(folder_paths.get_input_directory(), name)
    if not os.path.isdir(path):
        raise NPOError(
            f"{input_name}: '{name}' is not a folder in ComfyUI's input folder ({folder_paths.get_input_directory()})."
        )
    return path
