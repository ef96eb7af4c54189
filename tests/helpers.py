"""Reference code only the tests use: simpler forms of what the product computes in one step.

- encode: one (prompt, response) pair cut and EOS-terminated the way data.encode_dataset cuts every
  row (prompt from the left, response from the right).
- sequence_logps: summed log-probs of the masked tokens from full-sequence logits, the plain form of
  dpo.response_logps (which runs the LM head only on response positions)."""
from data import _cut_prompt, _cut_response, _ids
from dpo import token_logps


def encode(tok, prompt: str, response: str, max_prompt_len: int, max_response_len: int):
    """(prompt_ids, response_ids): prompt cut from the left, response from the right, EOS appended
    when the response fits whole."""
    return (_cut_prompt(tok, prompt, max_prompt_len)[0],
            _cut_response(_ids(tok, response), max_response_len, tok.eot_token)[0])


def sequence_logps(logits, tokens, mask):
    """Summed log-probs (B,) of the tokens selected by mask. logits[:, t] predicts tokens[:, t + 1],
    so logits[:, :-1] score tokens[:, 1:] and mask[:, 1:] selects the targets (response tokens +
    EOS)."""
    return (token_logps(logits[:, :-1], tokens[:, 1:]) * mask[:, 1:]).sum(-1)
