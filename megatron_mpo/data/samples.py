"""One shard sample -> one tokenized preference pair (prompt ids, two responses, tiles).

Every ``<image>`` placeholder becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tiles x
tokens_per_tile) + ``</img>``, built as ids. Length control never cuts an image: a pair
whose prompt leaves no room for a response token within ``max_length`` is dropped
(``prompt_too_long``); responses that do not fit are cut from the end
(``response_truncated``, the pair is kept). Tile counts come from image headers, so an
over-long sample is dropped before its pixels are decoded. Images must pass their format's
integrity checks (``Image.verify``: PNG chunk CRCs...) and decode without PIL's
truncated-image leniency, else the sample counts as ``bad_image``; so does an image whose
header gives more pixels than ``data.max_image_pixels`` (refused before decoding).
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageFile

from megatron_mpo.data.templates import IMAGE_PLACEHOLDER, ChatTemplate, normalize_placeholders
from megatron_mpo.data.tiling import count_tiles, image_to_tiles, tiles_per_image
from megatron_mpo.data.tokenizer import Tokenizer


# The default pixel budget of one image (data.max_image_pixels): 64 megapixels, 8000 x 8000,
# about 200 MB decoded as RGB; below PIL's own limit (89.5 megapixels), so this one says no first.
MAX_IMAGE_PIXELS = 64_000_000


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is the skip-count key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class LengthFit:
    """What ``max_length`` does to a pair of given token counts: the one length rule, applied
    by the loader (:meth:`PairBuilder.fit`) and by the length report (:mod:`.lengths`)."""

    room: int  # tokens each response may keep after the prompt; < 1: the pair is dropped
    chosen_cut: bool
    rejected_cut: bool

    @property
    def dropped(self) -> bool:
        """The prompt alone leaves no room for a response token (``prompt_too_long``)."""
        return self.room < 1


def fit_lengths(prompt: int, chosen: int, rejected: int, max_length: int) -> LengthFit:
    """The length rule: a pair whose prompt leaves no room for a response token within
    ``max_length`` is dropped (an image is never cut); a response that does not fit after
    the prompt is cut from the end."""
    room = max_length - prompt
    return LengthFit(room, room >= 1 and chosen > room, room >= 1 and rejected > room)


def pair_texts(meta: dict) -> Tuple[str, str, str]:
    """(question, chosen, rejected) of a sample's JSON; ``missing_field`` when one is absent or empty."""
    texts = meta.get("question"), meta.get("chosen"), meta.get("rejected")
    for name, value in zip(("question", "chosen", "rejected"), texts):
        if not isinstance(value, str) or not value:
            raise SampleError("missing_field", name)
    return texts


def tile_limit(value: object, max_tiles: int) -> int:
    """A sample's ``max_dynamic_patch`` clamped to ``max_tiles`` (absent: ``max_tiles``).

    The field comes from the data, so it may lower the configured budget but never raise
    it (tokens, memory and the grid search are sized by ``data.max_tiles``); anything but
    a whole number >= 1 is ``bad_field``.
    """
    if value is None:
        return max_tiles
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not whole or value < 1:
        raise SampleError("bad_field", f"max_dynamic_patch {value!r}"[:200])
    return min(int(value), max_tiles)


@contextlib.contextmanager
def strict_decoding():
    """Open and decode with PIL's truncated-image leniency off, whatever another library
    set, and PIL's own pixel limit (``DecompressionBombWarning`` / ``Error``) off: the
    pixel budget is ``data.max_image_pixels``, checked by :func:`open_image`."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image's header, after a pixel budget and the format's integrity checks.

    The size comes from the header, before anything is decoded: a 12000 x 12000 PNG can be
    136 KiB on disk and 1 GB and seconds to decode. ``verify()`` checks what the format
    can (PNG: every chunk's CRC, so a flipped byte that still inflates is caught); it
    leaves the image unusable, hence the second open.
    """
    try:
        with strict_decoding():
            with Image.open(io.BytesIO(data)) as probe:
                _check_pixels(probe.width, probe.height, max_pixels)
                probe.verify()
            img = Image.open(io.BytesIO(data))  # header only: size without decoding
    except SampleError:
        raise
    except Exception as exc:
        raise SampleError("bad_image", str(exc)) from None
    if img.width < 1 or img.height < 1:
        raise SampleError("bad_image", "empty image")
    return img


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise SampleError("bad_image", f"{width} x {height} = {width * height / 1e6:.1f} megapixels is over "
                                       f"data.max_image_pixels={max_pixels}")


@dataclass
class PromptPlan:
    """A prompt built from image headers alone: its ids and what decoding the tiles needs."""

    ids: List[int]
    images: List[Image.Image]  # opened, not decoded
    tiles: List[int]  # per image, thumbnail included
    budget: int  # most tiles of each image
    low: int  # fewest tiles of each image


@dataclass
class PairLengths:
    """Token counts of one sample (responses uncut) and what ``max_length`` does to it."""

    prompt: int  # image tokens included
    image: int  # <IMG_CONTEXT> tokens: tiles x tokens_per_tile
    chosen: int
    rejected: int
    fit: LengthFit


@dataclass
class TokenizedPair:
    """A preference pair ready for collation; both responses share prompt and tiles."""

    key: str  # "shard/key"
    prompt: List[int]
    chosen: List[int]
    rejected: List[int]
    pixel_values: torch.Tensor  # [tiles, 3, S, S]; tiles may be 0
    ref_chosen: Optional[float] = None
    ref_rejected: Optional[float] = None
    flags: List[str] = field(default_factory=list)  # counted events that did not drop it

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


@dataclass
class PairBuilder:
    """Tokenizes and tiles samples for one tokenizer/template/tiling setting."""

    tokenizer: Tokenizer
    template: ChatTemplate
    max_length: int
    max_tiles: int
    image_size: int
    tokens_per_tile: int
    min_tiles: int = 1
    use_thumbnail: bool = True
    system_message: Optional[str] = None
    max_image_pixels: int = MAX_IMAGE_PIXELS
    dynamic_tiling: bool = True  # False: each image is one tile (resized), as InternVL without dynamic_image_size

    def __post_init__(self):
        # The text after the prompt's last special token ("assistant\n"): responses are
        # tokenized as its continuation, as InternVL tokenizes "assistant\n{response}".
        tail = self.tokenizer.split_special(self.template.render_prompt("x", self.system_message))[-1]
        self._response_prefix = tail if tail not in self.tokenizer.special_ids else ""

    # -- pieces ---------------------------------------------------------------------------
    def prompt_ids(self, question: str, tiles: Sequence[int]) -> List[int]:
        """Prompt ids with image tokens for images of ``tiles[i]`` tiles each."""
        tok = self.tokenizer
        text = self.template.render_prompt(question, self.system_message)
        parts = text.split(IMAGE_PLACEHOLDER)
        if len(parts) - 1 != len(tiles):
            raise SampleError("placeholder_mismatch", f"{len(parts) - 1} placeholders, {len(tiles)} images")
        ids: List[int] = [tok.bos_id] if (self.template.bos and tok.add_bos) else []
        ids += tok.encode(parts[0])
        for n, part in zip(tiles, parts[1:]):
            ids.append(tok.img_start_id)
            ids.extend([tok.img_context_id] * (n * self.tokens_per_tile))
            ids.append(tok.img_end_id)
            ids += tok.encode(part)
        return ids

    def response_ids(self, response: str) -> List[int]:
        """Ids of a response including its end-of-turn token."""
        return self.answer_ids(self.template.render_response(response))

    def answer_ids(self, text: str) -> List[int]:
        """Ids of assistant text as tokenized right after the prompt (no end-of-turn added)."""
        return self.tokenizer.encode_continuation(self._response_prefix, text)

    def fit(self, prompt: List[int], chosen: List[int], rejected: List[int]) -> Tuple[List[int], List[int], bool]:
        """Cut responses so prompt + response <= max_length; SampleError if none fits."""
        fit = self._fit(len(prompt), len(chosen), len(rejected))
        return chosen[:fit.room], rejected[:fit.room], fit.chosen_cut or fit.rejected_cut

    def _fit(self, prompt: int, chosen: int = 0, rejected: int = 0) -> LengthFit:
        """:func:`fit_lengths` at this ``max_length``; ``prompt_too_long`` when the pair is dropped."""
        fit = fit_lengths(prompt, chosen, rejected, self.max_length)
        if fit.dropped:
            raise SampleError("prompt_too_long", f"prompt {prompt} tokens, max_length {self.max_length}")
        return fit

    @property
    def _image_ids(self) -> Tuple[int, int, int]:
        tok = self.tokenizer
        return tok.img_start_id, tok.img_end_id, tok.img_context_id

    def _check_image_tokens(self, prompt: List[int], tiles: Sequence[int]) -> None:
        """Refuse a question that spells image tokens itself (it would shift the image features)."""
        expected = (len(tiles), len(tiles), sum(tiles) * self.tokens_per_tile)
        if tuple(prompt.count(i) for i in self._image_ids) != expected:
            raise SampleError("image_token_in_text", "the text contains <img>, </img> or <IMG_CONTEXT>")

    def _refuse_image_tokens(self, *responses: List[int]) -> None:
        """Refuse responses that spell image tokens (the same rule for the answers)."""
        if any(i in self._image_ids for ids in responses for i in ids):
            raise SampleError("image_token_in_text", "the text contains <img>, </img> or <IMG_CONTEXT>")

    def tile_range(self, max_dynamic_patch: object, num_images: int) -> Tuple[int, int]:
        """(most, fewest) tiles of each image of a sample: the per-sample budget (lowered by the
        sample's ``max_dynamic_patch``) split over its images; (1, 1) without dynamic tiling."""
        limit = tile_limit(max_dynamic_patch, self.max_tiles)
        if not self.dynamic_tiling:
            return 1, 1
        return tiles_per_image(limit, num_images), self.min_tiles

    # -- whole sample ---------------------------------------------------------------------
    def prompt(self, question: str, image_bytes: Sequence[bytes], max_dynamic_patch: object = None,
               ) -> Tuple[List[int], torch.Tensor]:
        """(prompt ids, pixel values) of a question and its images: the one prompt rule that
        training, the reference tool and generation share. SampleError on bad data or a
        prompt that leaves no room for a response within ``max_length``."""
        plan = self.prompt_plan(question, image_bytes, max_dynamic_patch)
        self._fit(len(plan.ids))  # before any pixel is decoded
        pixel = []
        for img, n in zip(plan.images, plan.tiles):
            try:
                with strict_decoding():
                    img.load()
                t = image_to_tiles(img, self.image_size, plan.budget, plan.low, self.use_thumbnail)
            except Exception as exc:
                raise SampleError("bad_image", str(exc)) from None
            assert t.shape[0] == n, (t.shape, n)
            pixel.append(t)
        pixel_values = torch.cat(pixel) if pixel else torch.zeros(0, 3, self.image_size, self.image_size)
        return plan.ids, pixel_values

    def prompt_plan(self, question: str, image_bytes: Sequence[bytes], max_dynamic_patch: object = None,
                    ) -> PromptPlan:
        """The prompt from the image headers alone (tile counts follow from the image size),
        with no length limit: :meth:`prompt` goes on to decode the tiles, :meth:`measure` stops here."""
        question = normalize_placeholders(question, len(image_bytes))
        if question is None:
            raise SampleError("placeholder_mismatch", f"{len(image_bytes)} images")
        budget, low = self.tile_range(max_dynamic_patch, len(image_bytes))
        images = [open_image(data, self.max_image_pixels) for data in image_bytes]
        tiles = [count_tiles(img.width, img.height, self.image_size, budget, low, self.use_thumbnail)
                 for img in images]
        prompt = self.prompt_ids(question, tiles)
        self._check_image_tokens(prompt, tiles)
        return PromptPlan(prompt, images, tiles, budget, low)

    def build(
        self,
        key: str,
        meta: dict,
        image_bytes: Sequence[bytes],
        ref: Optional[Tuple[float, float]] = None,
    ) -> TokenizedPair:
        """A pair from a sample's JSON and its image bytes; SampleError on bad data."""
        question, chosen, rejected = pair_texts(meta)
        prompt, pixel_values = self.prompt(question, image_bytes, meta.get("max_dynamic_patch"))
        chosen_ids, rejected_ids = self.response_ids(chosen), self.response_ids(rejected)
        self._refuse_image_tokens(chosen_ids, rejected_ids)
        chosen_ids, rejected_ids, truncated = self.fit(prompt, chosen_ids, rejected_ids)
        pair = TokenizedPair(key, prompt, chosen_ids, rejected_ids, pixel_values)
        if ref is not None:
            pair.ref_chosen, pair.ref_rejected = float(ref[0]), float(ref[1])
        if truncated:
            pair.flags.append("response_truncated")
        return pair

    def measure(self, meta: dict, image_bytes: Sequence[bytes]) -> PairLengths:
        """:meth:`build`'s token counts without decoding an image, and what ``max_length`` does
        to them; SampleError on what :meth:`build` refuses, except ``prompt_too_long`` (``fit.dropped``)
        and what only decoding finds (a corrupt image body)."""
        question, chosen, rejected = pair_texts(meta)
        plan = self.prompt_plan(question, image_bytes, meta.get("max_dynamic_patch"))
        chosen_ids, rejected_ids = self.response_ids(chosen), self.response_ids(rejected)
        fit = fit_lengths(len(plan.ids), len(chosen_ids), len(rejected_ids), self.max_length)
        if not fit.dropped:  # build() refuses a too-long prompt before it looks at the responses
            self._refuse_image_tokens(chosen_ids, rejected_ids)
        return PairLengths(len(plan.ids), sum(plan.tiles) * self.tokens_per_tile, len(chosen_ids),
                           len(rejected_ids), fit)


def build_pair_builder(config, tokenizer: Tokenizer, *, image_size: int, tokens_per_tile: int) -> PairBuilder:
    """A PairBuilder from the ``data`` section (a DataConfig, its template resolved; tiling keys
    left null take the defaults) and the vision model's tile geometry."""
    from megatron_mpo.data.templates import get_template
    from megatron_mpo.data.tile_settings import resolve_tiling

    tiling, _ = resolve_tiling(config, {})
    return PairBuilder(
        tokenizer=tokenizer,
        template=get_template(config.template),
        max_length=config.max_length,
        max_tiles=tiling.max_tiles,
        image_size=image_size,
        tokens_per_tile=tokens_per_tile,
        min_tiles=tiling.min_tiles,
        use_thumbnail=tiling.thumbnail,
        system_message=config.system_message,
        max_image_pixels=config.max_image_pixels,
        dynamic_tiling=tiling.dynamic_tiling,
    )

