"""Sample data of the plugin (File > Open Sample > dirio): the pair of ``dirio demo``.

The MNI152 2009 template shipped inside nilearn (no download) at 2 mm, and the
same template deformed by the demo's known smooth warp (:func:`dirio.testing.synthetic.warped_pair`
with the demo's parameters), each with its grey/white-matter label map (1 grey matter, 2 white
matter), placed by the template's affine.
"""

from __future__ import annotations

from dirio.apps.napari.layers import LayerData, image_layer
from dirio.io.images import Image

def demo_pair() -> list[LayerData]:
    """Layers ``fixed``, ``moving`` (float32 in about [0, 1]) and their tissue label maps, with the
    known displacement (voxels, fixed grid) in the moving layer's ``metadata["true_disp"]``.

    Raises:
        DirioError: nilearn is not installed.
    """
    from dirio.apps.demo import demo_pair as demo_template_pair

    pair, affine = demo_template_pair()  # dirio demo's defaults: 2 mm, seed 0
    return [
        image_layer(Image(pair.fixed, affine), "fixed", colormap="gray"),
        image_layer(Image(pair.moving, affine), "moving", colormap="gray", visible=False,
                    metadata={"true_disp": pair.true_disp}),
        image_layer(Image(pair.fixed_labels, affine), "fixed tissue", kind="labels", opacity=0.4, visible=False),
        image_layer(Image(pair.moving_labels, affine), "moving tissue", kind="labels", opacity=0.4, visible=False),
    ]
