"""Text encoders: captions -> fixed-size embeddings that text-conditioned compartments read."""

from .encoder import (MINILM, TEXT_ENCODERS, CaptionEmbeddings, EncoderEntry, MiniLMEncoder, TextEncoder,
                      caption_embeddings, create_text_encoder, embed_captions, encoder_names, text_dim)

__all__ = ["MINILM", "TEXT_ENCODERS", "CaptionEmbeddings", "EncoderEntry", "MiniLMEncoder", "TextEncoder",
           "caption_embeddings", "create_text_encoder", "embed_captions", "encoder_names", "text_dim"]
