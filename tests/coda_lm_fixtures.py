"""Fixtures shared by the CODA-LM tests: tiny data in the exact official layout, a fake judge server, a fake
official checkout, a tiny LLaVA checkpoint and a simulator-style ScenePool.

    root/test/images/0001.jpg, 0002.jpg   (64 x 48 JPEGs)
    root/val/images/0007.jpg
    root/CODA-LM/Mini/test_0001.json, test_0002.json
    root/CODA-LM/Train/val_0007.json
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

from datasets_cfg.schema import ScenePool, new_row

W, H = 64, 48


def make_image(path: Path, size=(W, H), color=(40, 120, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def annotation(n_regions: int = 2, summary: bool = True, tag: str = "") -> dict:
    """One official-format annotation; texts carry `tag` so files are distinguishable."""
    gp = {
        "vehicles": [
            {"description": f"A white sedan ahead{tag}.", "explanation": "It may brake suddenly."},
            {"description": "A bus on the left.", "explanation": "It may merge into our lane."},
        ],
        "vulnerable_road_users": [{"description": "A cyclist on the right.", "explanation": "It may swerve."}],
        "traffic signs": [],
        "traffic lights": [{"description": "A red light ahead.", "explanation": "The ego car must stop."}],
        "traffic cones": [],
        "barriers": [],
        "other objects": [{"description": "Debris on the road.", "explanation": "It must be avoided."}],
    }
    if summary:
        gp["description and explanation"] = f"Summary{tag}: a sedan, a bus, a cyclist, a red light and debris."
    regions = {
        "1": {"description and explanation": f"A traffic cone{tag}; keep away.", "box": [10, 5, 20, 30], "category_name": "traffic_cone"},
        "2": {"description and explanation": "A dog crossing; slow down.", "box": [0.5, 1.5, 63.0, 46.0], "category_name": "dog"},
        "3": {"description and explanation": "A truck parked; pass wide.", "box": [30, 20, 10, 10], "category_name": "truck"},
    }
    return {
        "general_perception": gp,
        "region_perception": {k: regions[k] for k in list(regions)[:n_regions]},
        "driving_suggestion": f"Slow down{tag}, stop at the red light and keep clear of the cyclist.",
    }


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    return path


def coda_tree(root: Path) -> Path:
    """Write the two-split fixture tree under `root`; returns root."""
    make_image(root / "test/images/0001.jpg")
    make_image(root / "test/images/0002.jpg", color=(200, 60, 60))
    make_image(root / "val/images/0007.jpg")
    write_json(root / "CODA-LM/Mini/test_0001.json", annotation(2, tag=" one"))
    write_json(root / "CODA-LM/Mini/test_0002.json", annotation(3, tag=" two"))
    write_json(root / "CODA-LM/Train/val_0007.json", annotation(1, summary=False, tag=" seven"))
    return root


def tree_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ----------------------------------------------------------------------------------------------
# a fake OpenAI-compatible judge: a real HTTP server on loopback, speaking chat-completions



def rating_from_prediction(body: dict) -> str:
    """Default fake behaviour: the prediction text says "rated N" and the judge replies with that rating."""
    last = body["messages"][-1]["content"]
    pred = last.split("[Predicted text]\n", 1)[-1] if "[Predicted text]" in last else last.split("[The Start of Prediction Text]\n", 1)[-1]
    m = re.search(r"rated (\d+)", pred)
    return f"The prediction matches partly. Rating: [[{m.group(1)}]]" if m else "I cannot decide."


class FakeJudge:
    """`behave(body, headers, attempt)` -> (status, reply_text | raw bytes, delay_s); `attempt` counts requests
    for the same user message. Requests are recorded in `requests` (body, headers)."""

    def __init__(self, behave=None):
        self.behave = behave or (lambda body, headers, attempt: (200, rating_from_prediction(body), 0.0))
        self.requests, self.attempts = [], {}
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = body["messages"][-1]["content"]
                with judge.lock:
                    judge.requests.append((self.path, body, dict(self.headers)))
                    attempt = judge.attempts[key] = judge.attempts.get(key, 0) + 1
                status, reply, delay = judge.behave(body, dict(self.headers), attempt)
                if delay:
                    time.sleep(delay)
                if isinstance(reply, bytes):
                    data = reply
                elif status == 200:
                    data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                       "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}).encode()
                else:
                    data = json.dumps({"error": {"message": reply}}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def free_port_url():
    """`with free_port_url() as url:` a loopback URL with nothing listening (an endpoint that is down). The port
    stays bound, but not listening, until the block ends: a connect to it is refused (Linux answers a SYN to a
    bound, non-listening TCP port with a reset) and no other process can take the port in the meantime."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    finally:
        s.close()


# ----------------------------------------------------------------------------------------------
# a fake checkout of DLUT-LYZ/CODA-LM with the official file layout (texts are ours, marked FAKE)

_TEMPLATE = "[The Start of Reference Text]\\n{}\\n[The End of Reference Text]\\n\\n[The Start of Prediction Text]\\n{}\\n[The End of Prediction Text]"


def _stage_script(n: int, few_shot: str | None) -> str:
    shots = (f'''        few_shot = os.path.join(os.path.dirname(os.path.abspath(__file__)), "{few_shot}")
        with open(os.path.join(few_shot, "high.json")) as f:
            high_data = json.load(f)
        with open(os.path.join(few_shot, "low.json")) as f:
            low_data = json.load(f)
''' if few_shot else "")
    return f'''import os, json
open(os.path.join(os.path.dirname(__file__), "EXECUTED"), "w")  # proves the file is never run

class GPTBatcher:
    def __init__(self, api_key, system_prompt="", temperature=0):
        self.system_prompt = "FAKE official judge for stage {n}. End with: \\"Rating: [[10]]\\"."
        self.temperature = temperature

    def create_messages(self, message):
{shots}        template = "{_TEMPLATE}"
        return template

if __name__ == "__main__":
    json_list = sorted(each for each in os.listdir(".") if each.endswith(".json"))
    txt_name = json_list[0].replace(".json", ".txt")
'''


def official_checkout(root: Path, with_box_text: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "convert2vqa.py").write_text('''import os
open(os.path.join(os.path.dirname(__file__), "EXECUTED"), "w")
for json_name in []:
    stage1_data = dict(question_id=0, image="x", question="FAKE official general question.")
    stage2_data = dict(question_id=0, image="x", question="FAKE official suggestion question.")
    stage3_data = dict(question_id=0, image="x", question="FAKE official region question: the red rectangle.")
''')
    if with_box_text:
        (root / "codalm_dataloader.py").write_text('''prompt = {
    "general_perception": "unused",
    "region_perception": "FAKE describe this object <boxes> please.",
}
''')
    ev = root / "evaluation"
    ev.mkdir(exist_ok=True)
    (ev / "stage1_eval_batch.py").write_text(_stage_script(1, "scene_few_shot"))
    (ev / "stage2_eval_batch.py").write_text(_stage_script(2, "suggestion_few_shot"))
    (ev / "stage3_eval_batch.py").write_text(_stage_script(3, None))
    for folder, tag in (("scene_few_shot", "scene"), ("suggestion_few_shot", "sugg")):
        for name, r in (("high", 8), ("low", 2)):
            write_json(ev / folder / f"{name}.json", {"reference": f"{tag} {name} ref", "prediction": f"{tag} {name} pred",
                                                      "response": f"{tag} {name} reasoning. Rating: [[{r}]]"})
    return root


# ----------------------------------------------------------------------------------------------
# a tiny LLaVA checkpoint built offline: random weights, a word-level tokenizer trained here


def tiny_llava(path: Path, seed: int = 0) -> Path:
    """Save a ~100k-parameter LlavaForConditionalGeneration + LlavaProcessor to `path` (it generates gibberish)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast,
                              SiglipImageProcessor, SiglipVisionConfig)

    corpus = ["the white car ahead is braking", "a pedestrian crosses the road on the left", "slow down and keep a safe distance",
              "a traffic cone blocks the right lane", "the red light means the ego car must stop", "describe the object inside the red rectangle"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<image>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} "
                "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}answer {% endif %}")
    processor = LlavaProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=fast, patch_size=16,
                               vision_feature_select_strategy="full", chat_template=template)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16,
                                initializer_range=0.5)
    text = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.5, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=fast.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="full", vision_feature_layer=-1, image_seq_length=4)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# a ScenePool with CODA-style qa, as the simulator corpus produces


def pool_qa(qid, task, answer, category="", box=()):
    return {"qid": qid, "task": task, "question": "stored question", "answer": answer, "category": category, "box": list(box), "skills": []}


def sim_pool(tmp_path):
    pool_dir = tmp_path / "simpool"
    make_image(pool_dir / "images/s1.png", size=(80, 60))
    make_image(pool_dir / "images/s2.png", size=(80, 60))
    rows = [
        new_row("s1", "sim", "heldout", source="synthetic", images=[{"frame": 0, "camera": "front", "path": "images/s1.png"}],
                qa=[pool_qa("s1:general", "general", "Two cars ahead."), pool_qa("s1:region:0", "region", "A car braking.", "car", (10, 10, 20, 15)),
                    pool_qa("s1:suggestion", "suggestion", "Keep distance.")]),
        # per-category general annotations only: one joined general question
        new_row("s2", "sim", "heldout", source="synthetic", images=[{"frame": 0, "camera": "front", "path": "images/s2.png"}],
                qa=[pool_qa("s2:g:vehicles", "general", "A truck merges.", "vehicles"),
                    pool_qa("s2:g:cones", "general", "Cones close a lane.", "traffic cones")]),
    ]
    ScenePool.from_rows(rows).save(pool_dir)
    return pool_dir
