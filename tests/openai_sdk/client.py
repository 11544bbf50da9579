"""Drives a running diffusiond with the official `openai` Python SDK (tests/server_openai_sdk.rs).

Usage: client.py BASE_URL API_KEY. Prints one line per check; exits non-zero on the first failure.
"""
import base64
import io
import sys
import urllib.request

import openai
from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent, ImagesResponse

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)


def check(cond, what):
    if not cond:
        print("FAIL:", what, flush=True)
        sys.exit(1)
    print("ok:", what, flush=True)


def png_size(data):
    # IHDR: width and height, big-endian, at bytes 16..24.
    check(data[:8] == b"\x89PNG\r\n\x1a\n", "a PNG file")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


print("openai", openai.__version__, flush=True)

models = client.models.list()
ids = [m.id for m in models]
check("z-image-turbo" in ids and "gpt-image-2" in ids, f"models.list() -> {len(ids)} models")

r = client.images.generate(model="z-image-turbo", prompt="a red fox in the snow", size="64x64", extra_body={"seed": 7, "steps": 2})
check(isinstance(r, ImagesResponse) and len(r.data) == 1, "images.generate b64_json (default)")
raw = base64.b64decode(r.data[0].b64_json)
check(png_size(raw) == (64, 64), "b64_json decodes to a 64x64 PNG")
check(r.size == "64x64" and r.output_format == "png" and r.background == "opaque", "response size/output_format/background")

r2 = client.images.generate(model="flux-2-pro", prompt="a lighthouse", n=2, size="96x64", response_format="url",
                            output_format="jpeg", extra_body={"steps": 2})
check(len(r2.data) == 2 and all(d.url and d.url.startswith(base + "/files/gen/") for d in r2.data), "n=2 with url")
for d in r2.data:
    with urllib.request.urlopen(d.url) as f:
        body = f.read()
        check(f.headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8", "url serves a JPEG")

r3 = client.images.generate(model="gpt-image-2", prompt="a cat", size="128x128", quality="low", extra_body={"steps": 2})
check(png_size(base64.b64decode(r3.data[0].b64_json)) == (128, 128) and r3.quality == "low", "gpt-image-2 128x128 quality=low")

try:
    client.images.generate(model="no-such-model", prompt="x")
    check(False, "unknown model is refused")
except openai.BadRequestError as e:
    check(e.status_code == 400 and e.code == "invalid_model" and e.param == "model", f"BadRequestError invalid_model: {e.message}")

try:
    client.images.generate(model="z-image-turbo", prompt="x", background="transparent")
    check(False, "transparent background is refused")
except openai.BadRequestError as e:
    check("opaque" in e.message, "transparent background: 400 that says why")


def stream_with_partials(model, prompt, seed, steps):
    """stream=True, partial_images=2: events parsed by the SDK's own types; returns (partials, final bytes)."""
    stream = client.images.generate(model=model, prompt=prompt, size="64x64", stream=True, partial_images=2,
                                    extra_body={"seed": seed, "steps": steps})
    partials, completed = [], []
    for event in stream:
        if isinstance(event, ImageGenPartialImageEvent):
            check(not completed, f"{model}: partial images come before the completed event")
            partials.append(event)
        elif isinstance(event, ImageGenCompletedEvent):
            completed.append(event)
        else:
            check(False, f"unexpected event type {type(event)}")
    check([p.partial_image_index for p in partials] == [0, 1], f"{model}: two partial_image events, indexes 0 and 1")
    for p in partials:
        check(p.type == "image_generation.partial_image" and p.size == "64x64" and p.output_format == "png"
              and p.background == "opaque" and p.quality and p.created_at > 0,
              f"{model}: partial_image {p.partial_image_index} fields as OpenAI sends them")
        check(png_size(base64.b64decode(p.b64_json)) == (64, 64), f"{model}: partial image decodes to a 64x64 PNG")
    check(len(completed) == 1 and completed[0].type == "image_generation.completed", f"{model}: one completed event")
    final = base64.b64decode(completed[0].b64_json)
    check(all(base64.b64decode(p.b64_json) != final for p in partials), f"{model}: partial images are not the final image")
    check(partials[0].b64_json != partials[1].b64_json, f"{model}: the two partial images differ (taken at different steps)")
    return final


for model, steps in [("z-image-turbo", 6), ("flux-2-pro", 4)]:
    streamed = stream_with_partials(model, "a sailing boat", 11, steps)
    plain = client.images.generate(model=model, prompt="a sailing boat", size="64x64", extra_body={"seed": 11, "steps": steps})
    same = base64.b64decode(plain.data[0].b64_json)
    check(streamed == same, f"{model}: streamed final image is bit-exact with the non-streaming one (same seed)")
print("ALL OK", flush=True)
