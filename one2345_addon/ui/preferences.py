"""The add-on preferences' class and its drawing: where the server comes from and how it runs, the set-up buttons,
and the Weights box. Environment only; job options live in the scene. Code that only reads the preferences uses
``core/settings.py``."""

# No `from __future__ import annotations`: Blender reads property annotations as objects, not strings.

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, StringProperty

from ..core import images, jobs, server_state
from ..core import settings as addon_prefs
from ..ops import weights

STATE = server_state.STATE


class ONE2345_AP_preferences(bpy.types.AddonPreferences):
    """Server interpreter or remote URL, weights, device and the import size."""

    bl_idname = addon_prefs.PACKAGE

    server_mode: EnumProperty(
        name="Server", description="Where jobs run",
        items=(("LOCAL", "Start Locally", "Start the server with the Python below when first needed"),
               ("REMOTE", "Connect to URL", "Use a server that is already running (e.g. a GPU box via SSH tunnel)")),
        default="LOCAL")
    python_path: StringProperty(
        name="Server Python", subtype="FILE_PATH",
        description="Python of a virtual environment with the One2345 server installed (never Blender's own)")
    server_url: StringProperty(name="Server URL", description="Base URL of a running server",
                               default="http://127.0.0.1:8000")
    server_token: StringProperty(name="Token", subtype="PASSWORD",
                                 description="The server's ONE2345_TOKEN (bearer token)")
    weights_dir: StringProperty(name="Weights Folder", subtype="DIR_PATH",
                                description="Folder with the model weights (empty: the server's default)")
    device: EnumProperty(
        name="Device", description="Where the models run",
        items=(("auto", "Auto", "CUDA when available, else CPU"), ("cuda", "GPU (CUDA)", ""), ("cpu", "CPU", "")),
        default="auto")
    low_vram: BoolProperty(name="Low VRAM", default=False,
                           description="Keep the models in main memory and move each to the GPU only for its stage "
                                       "(for GPUs with little memory; slower, same result)")
    keep_warm: BoolProperty(name="Keep Server Warm", default=True,
                            description="Keep the server and its models loaded between jobs (faster next job)")
    import_size: FloatProperty(name="Import Size", default=1.0, min=0.0, soft_max=10.0, subtype="DISTANCE",
                               description="Largest dimension of an imported mesh (0 keeps the server's scale)")
    show_advanced: BoolProperty(name="Advanced", default=False)
    preset: EnumProperty(
        name="Model Preset", description="Models the server loads",
        items=(("paper", "Paper", "The official One-2-3-45 models"),
               ("tiny", "Tiny", "Small random models (testing the set-up, not real results)")),
        default="paper")
    extra_args: StringProperty(name="Extra Server Arguments", description="More `serve` flags, e.g. --max-queue 4")
    startup_timeout: FloatProperty(name="Start-up Timeout", default=180.0, min=5.0, soft_max=1200.0, unit="TIME",
                                   description="Seconds to wait for the server to report ready")
    server_package: StringProperty(
        name="Server Package", default="",
        description="Empty: the server bundled with this add-on (recommended: the versions match). Otherwise what "
                    "'Set Up Server Environment' installs with pip: a path, a wheel or a URL")
    status_text: StringProperty(name="Status", description="Result of the last check or set-up", options={"SKIP_SAVE"})

    def draw(self, context: bpy.types.Context) -> None:
        """Server settings, the check/set-up buttons and their last result."""
        layout = self.layout
        layout.use_property_split = True
        layout.prop(self, "server_mode", expand=True)
        if self.server_mode == "LOCAL":
            layout.prop(self, "python_path")
            layout.prop(self, "weights_dir")
            layout.prop(self, "device")
            layout.prop(self, "low_vram")
            layout.prop(self, "keep_warm")
        else:
            layout.prop(self, "server_url")
            layout.prop(self, "server_token")
        layout.prop(self, "import_size")
        row = layout.row(align=True)
        row.operator("one2345.check_server", icon="CHECKMARK")
        row.operator("one2345.stop_server", icon="CANCEL")
        row.operator("one2345.open_log", text="Server Log", icon="TEXT").which = "server"
        box = layout.box()
        row = box.row(align=True)
        row.enabled = bpy.app.online_access
        row.operator("one2345.setup_server_env", icon="IMPORT")
        row.operator("one2345.open_log", text="Set-up Log", icon="TEXT").which = "setup"
        if not bpy.app.online_access:
            box.label(text="Online access is off (Preferences > System): set-up needs it to download packages",
                      icon="INFO")
        task = jobs.last()
        if task is not None and task.state == "running":
            box.label(text=f"{task.name.capitalize()}: {task.progress.stage}", icon="TIME")
        elif self.status_text:
            for line in self.status_text.splitlines()[:8]:
                box.label(text=line)
        draw_weights(layout)
        layout.prop(self, "show_advanced")
        if self.show_advanced:
            layout.prop(self, "preset")
            layout.prop(self, "extra_args")
            layout.prop(self, "startup_timeout")
            layout.prop(self, "server_package")


def draw_weights(layout: bpy.types.UILayout) -> None:
    """The preferences' Weights box: the folder, each file's state, Download or Import from Folder with progress and
    Cancel, an import's report per file, and the one-time set-up the first Generate runs."""
    box = layout.box()
    row = box.row()
    row.label(text="Model Weights", icon="FILE_BLEND")
    row.operator("one2345.refresh_weights", text="", icon="FILE_REFRESH")
    listing = STATE.weights
    if listing is None:
        box.label(text="Not checked yet: Refresh asks the server (starting it if needed).", icon="QUESTION")
    else:
        box.label(text=f"Folder: {listing.get('folder')}", icon="FILE_FOLDER")
        col = box.column(align=True)
        for f in listing.get("files") or []:
            if f in images.text_files(listing):
                continue  # one line for the whole text model, below
            state = f.get("state", "?")
            icon = {"present": "CHECKMARK", "partial": "TIME", "missing": "X", "corrupt": "ERROR"}.get(state, "DOT")
            size = server_state.human_bytes(f.get("expected_bytes"))
            needed = "required" if f.get("required") else "optional"
            col.label(text=f"{f.get('name')}: {state} ({size}, {needed}) — {f.get('licence')}", icon=icon)
    task = weights.current_download()
    if task is not None:
        p = task.progress
        eta = f", {server_state.format_seconds(p.eta_s)} left" if p.eta_s else ""
        box.progress(factor=p.fraction, type="BAR", text=f"{p.stage} ({p.fraction:.0%}{eta})")
        box.operator("one2345.cancel_weights_download", text=f"Cancel {task.operation.capitalize()}",
                     icon="CANCEL")
        return
    report = weights.import_outcomes(STATE.download)
    if report:
        col = box.column(align=True)
        col.label(text="Last import:", icon="IMPORT")
        for ok, text in report:
            col.label(text=text, icon="CHECKMARK" if ok else "ERROR")
    missing = STATE.missing_bytes()
    if listing is None or missing > 0:
        row = box.row(align=True)
        row.scale_y = 1.3
        row.operator("one2345.download_weights", text=f"Download (≈ {server_state.human_bytes(missing)})",
                     icon="IMPORT")
        row.operator("one2345.import_weights", icon="FILE_FOLDER")
    else:
        box.label(text="Every weight file is present.", icon="CHECKMARK")
    draw_text_model(box, listing)
    if weights.conversion_ahead():
        col = box.column(align=True)
        col.label(text="The first Generate converts Zero123-XL once (15.5 GB → 5 GB, about a minute).", icon="INFO")
        col.label(text="To do it now instead, run in a terminal: one2345 weights prepare")
        col.operator("one2345.copy_prepare_command", icon="COPYDOWN")


def draw_text_model(box: bpy.types.UILayout, listing: dict | None) -> None:
    """The optional text-to-image model (Prompt input): one line for its files, and its own Download."""
    files = images.text_files(listing)
    if not files:
        return
    missing, size = images.text_missing(listing)
    total = sum(int(f.get("expected_bytes") or 0) for f in files)
    col = box.column(align=True)
    state = "present" if not missing else f"{len(missing)} of {len(files)} files missing"
    col.label(text=f"Text to 3D (optional): text-to-image model, {state} ({server_state.human_bytes(total)})",
              icon="CHECKMARK" if not missing else "X")
    col.label(text=f"Licence: {files[0].get('licence')}")
    if missing and weights.current_download() is None:
        col.operator("one2345.download_text_weights",
                     text=f"Download Text Model (≈ {server_state.human_bytes(size)})", icon="IMPORT")


CLASSES = (ONE2345_AP_preferences,)


def register() -> None:
    """Register the preferences class."""
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    """Unregister; forget finished tasks that refer to this module's state."""
    jobs.set_last(None)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
