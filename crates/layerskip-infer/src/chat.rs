//! Chat templates: the Jinja template of a checkpoint's `tokenizer_config.json`, rendered with
//! `minijinja` as Hugging Face's `apply_chat_template` does.

use std::path::Path;

use minijinja::{Environment, context};

use crate::error::{InferError, Result};

/// A checkpoint's chat template with its special tokens.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Reads `chat_template` (from `tokenizer_config.json`, or `chat_template.jinja`) in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                InferError::InvalidArgument(format!("{}: {e}", config_path.display()))
            })?,
            Err(_) => serde_json::Value::Null,
        };
        let token = |key: &str| match &config[key] {
            serde_json::Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or_default().to_string(),
        };
        let source = match config["chat_template"].as_str() {
            Some(t) => t.to_string(),
            None => std::fs::read_to_string(dir.join("chat_template.jinja")).map_err(|_| {
                InferError::InvalidArgument(format!(
                    "{} has no chat template (tokenizer_config.json \"chat_template\" or chat_template.jinja)",
                    dir.display()
                ))
            })?,
        };
        Ok(Self {
            source,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        })
    }

    /// Renders one user message, followed by the assistant turn's opening.
    pub fn render_user(&self, message: &str) -> Result<String> {
        self.render(&[("user", message)])
    }

    /// Renders a conversation of `(role, content)` messages, followed by the assistant turn's
    /// opening.
    pub fn render(&self, messages: &[(&str, &str)]) -> Result<String> {
        let mut env = Environment::new();
        env.add_template("chat", &self.source)
            .map_err(|e| InferError::InvalidArgument(format!("chat template: {e}")))?;
        let template = env.get_template("chat").expect("just added");
        template
            .render(context! {
                messages => messages
                    .iter()
                    .map(|(role, content)| context! { role => role, content => content })
                    .collect::<Vec<_>>(),
                add_generation_prompt => true,
                bos_token => self.bos_token.clone(),
                eos_token => self.eos_token.clone(),
            })
            .map_err(|e| InferError::InvalidArgument(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_style_template_renders_like_transformers() {
        // SmolLM2-Instruct's template (abridged to its structure) and the string transformers'
        // apply_chat_template(add_generation_prompt=True) produces for one user message.
        let t = ChatTemplate {
            source: "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}".into(),
            bos_token: "<|im_start|>".into(),
            eos_token: "<|im_end|>".into(),
        };
        assert_eq!(
            t.render_user("Hi").unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
