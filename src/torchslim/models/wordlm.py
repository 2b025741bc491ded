"""A PTB-style word-level LSTM language model (Zaremba et al. 2014; the model ISS compresses)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from torchslim.errors import ConfigError

State = tuple[Tensor, Tensor]


class WordLM(nn.Module):
    """embedding → dropout → stacked LSTM (sequence first) → dropout → decoder, optionally tied.

    ``forward(tokens (T, B)) → logits (T, B, V)`` starts from a zero state: that is what tracing,
    ``structures`` and ``compact`` see. Truncated BPTT carries the state with :meth:`step`.

    Args:
        vocab_size: ``V``.
        hidden_size: embedding and LSTM width ``H`` (equal, as in the ISS paper's PTB model); with
            ``per_layer``, also one width per layer, e.g. ``[373, 315]`` (the embedding takes the last,
            which a tied decoder reads): the shape ISS compaction leaves, trained from scratch.
        num_layers: stacked LSTM layers.
        dropout: on the embedding, between LSTM layers and before the decoder.
        tie_weights: the decoder shares the embedding table (Press & Wolf 2017).
        per_layer: one single-layer ``nn.LSTM`` per layer (``self.layers``) instead of one stacked
            ``nn.LSTM`` (``self.lstm``). An ``nn.LSTM`` has one hidden size, so only this form lets ISS
            compaction give each layer its own width (the paper's PTB result: 1500, 1500 → 373, 315).
    """

    def __init__(self, vocab_size: int, hidden_size: int | Sequence[int] = 200, num_layers: int = 2,
                 dropout: float = 0.2, tie_weights: bool = True, per_layer: bool = False) -> None:
        super().__init__()
        sizes = [hidden_size] * num_layers if isinstance(hidden_size, int) else [int(h) for h in hidden_size]
        if len(sizes) != num_layers or not per_layer and len(set(sizes)) > 1:
            raise ConfigError(f"hidden_size {hidden_size} needs one width per layer (num_layers={num_layers}) "
                              f"and per_layer=True for different widths")
        width = sizes[-1]  # the embedding feeds layer 0 and, tied, is the decoder that reads the last layer
        self.encoder = nn.Embedding(vocab_size, width)
        if per_layer:
            ins = [width, *sizes[:-1]]
            self.layers = nn.ModuleList(nn.LSTM(i, h) for i, h in zip(ins, sizes))
        else:
            self.lstm = nn.LSTM(width, width, num_layers, dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(width, vocab_size)
        # Zaremba et al. and PyTorch's word_language_model: U(-0.1, 0.1) tables, zero decoder bias. nn.Embedding's
        # N(0, 1) would give a tied decoder logits of scale sqrt(H) and ISS groups with 20x the norm of the LSTM's.
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.encoder.weight

    def step(self, tokens: Tensor, state: State | list[State] | None = None) -> tuple[Tensor, State | list[State]]:
        """``tokens (T, B)``, the previous chunk's state → ``(logits (T, B, V), state)``.

        The state is ``(h, c)`` of the stacked LSTM, or a list with one ``(h, c)`` per layer.
        """
        x = self.drop(self.encoder(tokens))  # (T, B, H)
        if hasattr(self, "lstm"):
            out, state = self.lstm(x, state)
        else:
            states = state if state is not None else [None] * len(self.layers)
            state = []
            for i, (layer, s) in enumerate(zip(self.layers, states)):
                x, s = layer(x if i == 0 else self.drop(x), s)
                state.append(s)
            out = x
        return self.decoder(self.drop(out)), state

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens (T, B)`` → ``logits (T, B, V)`` from a zero state."""
        return self.step(tokens)[0]
