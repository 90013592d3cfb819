"""ComfyUI entry point of the Cross-Space Distillation pack.

ComfyUI imports this file as a package under a name derived from its path (the folder is not on
sys.path), so everything below uses relative imports. The node module, and with it torch-heavy code,
is imported only when ComfyUI asks for the extension.
"""


async def comfy_entrypoint():
    from .nodes import CrossSpaceExtension

    return CrossSpaceExtension()
