"""Decoder rows through the server: a row's result does not depend on the requests it shares a forward with."""
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from engine import Engine


def _gpt2_with_token_types(path) -> Engine:
    """A tiny GPT-2 whose (generic) tokenizer returns token_type_ids, which GPT-2's own does not."""
    torch.manual_seed(0)
    transformers.GPT2Model(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                   n_positions=64)).save_pretrained(path)
    words = Tokenizer(models.WordLevel({"<unk>": 0, **{f"t{i}": i for i in range(1, 100)}}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>",  # transformers 5 asks for types
                                         model_input_names=["input_ids", "token_type_ids", "attention_mask"]
                                         ).save_pretrained(path)
    engine = Engine.from_pretrained(path, device="cpu")
    assert "token_type_ids" in engine.tokenizer(["t5"])
    return engine


def test_a_pre_tokenised_row_beside_a_text_row_equals_it_alone(start_server, tmp_path):
    # the text row brought token types, the ids row got zeros beside it, and GPT-2 added wte(0) to it: 1.03 off
    engine = _gpt2_with_token_types(tmp_path)
    running = start_server(engine=engine)
    with running.client() as client:
        alone = torch.tensor(client.embed([[5, 6, 7]])[0])
        beside = torch.tensor(client.embed(["t1 t2", [5, 6, 7]])[1])
        as_text = torch.tensor(client.embed(["t5 t6 t7"])[0])
    assert (alone - beside).abs().max() < 1e-6
    # decoders take no token types from the tokenizer: the text is the same row as its ids, here and in process
    assert (alone - as_text).abs().max() < 1e-6
    assert (engine.embed(["t5 t6 t7"])[0] - as_text).abs().max() < 1e-6
