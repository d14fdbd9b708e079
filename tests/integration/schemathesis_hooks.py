"""schemathesis hooks (``SCHEMATHESIS_HOOKS=tests.integration.schemathesis_hooks``): real pictures.

The schema says which picture types an upload field accepts (``encoding.contentType``); for each,
schemathesis draws a real picture of random size, mode and content from this strategy, so the
fuzzed requests that follow the schema run the whole pipeline, not just the decoder's refusals.
"""

from __future__ import annotations

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP", "image/bmp": "BMP"}
MODES = {"JPEG": ["RGB", "L", "CMYK"], "PNG": ["RGB", "RGBA", "L", "P", "I;16"], "WEBP": ["RGB", "RGBA"],
         "BMP": ["RGB", "L", "P"]}


@st.composite
def pictures(draw: st.DrawFn, fmt: str) -> bytes:
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**32 - 1))
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    mode = draw(st.sampled_from(MODES[fmt]))
    im = Image.fromarray(rgb)
    im = im.convert("L").convert("I;16") if mode == "I;16" else im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


for media_type, fmt in FORMATS.items():
    schemathesis.openapi.media_type(media_type, pictures(fmt))
