"""RL prompt data: jsonl/parquet datasets (with images), chat-template rendering, the synthetic arithmetic
and visual tasks.

from megatron_sapo.data import ArithmeticTask, VisualTask, load_records, render_prompt
records = load_records("train.jsonl", prompt_field="question", answer_field="answer",
                       answer_extract="gsm8k")
train, evals = ArithmeticTask().splits(n_train=512, n_eval=128, seed=0)
images_train, images_eval = VisualTask(kind="color").splits(n_train=512, n_eval=128, seed=0)
ids = render_prompt(train[0], tokenizer)
records = load_records("geo3k.parquet", prompt_field="problem", image_fields=["images"])
prompt = ImageRenderer(processor, max_pixels=512 * 512).render(records[0])   # -> ImagePrompt

The `data:` run-config section is `config.py`. May import megatron_sapo.utils only (the layer map is in
megatron_sapo/__init__.py).
"""

from megatron_sapo.data.datasets import DataError, PromptRecord, load_records, render_prompt
from megatron_sapo.data.images import load_image, to_data_uri
from megatron_sapo.data.synthetic import ArithmeticTask, arithmetic_records, sft_text
from megatron_sapo.data.vision import ImagePrompt, ImageRenderer, smart_resize
from megatron_sapo.data.visual_task import VisualTask

__all__ = [
    "ArithmeticTask",
    "DataError",
    "ImagePrompt",
    "ImageRenderer",
    "PromptRecord",
    "VisualTask",
    "arithmetic_records",
    "load_image",
    "load_records",
    "render_prompt",
    "sft_text",
    "smart_resize",
    "to_data_uri",
]
