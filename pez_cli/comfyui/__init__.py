"""PEZ nodes for ComfyUI: "PEZ Invert", "PEZ Style" and "PEZ Distill".

This folder is a ComfyUI node pack. After `pip install pez-cli` in ComfyUI's Python, link it
into ComfyUI's custom_nodes folder (see docs/comfyui.md):

    ln -s "$(python -c 'import pez_cli.comfyui, os; print(os.path.dirname(pez_cli.comfyui.__file__))')" \\
        ComfyUI/custom_nodes/pez
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
