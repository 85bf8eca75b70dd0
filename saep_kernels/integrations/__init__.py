"""Drop-in integrations: Hugging Face transformers LLaVA models (``.transformers``) and
LLaVA-style ``build_vision_projector`` configs (``.llava``). Import them explicitly; the core
package never imports transformers."""
