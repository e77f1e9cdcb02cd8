//! `monstervm console`: the serial console of a running VM over its API's WebSocket.
//!
//! Output appears as the guest writes it, starting with the recent output the VMM kept.
//! On a TTY, [`ESCAPE_KEY`](crate::cli::terminal::ESCAPE_KEY) (Ctrl-]) detaches and leaves
//! the VM running. From a pipe, bytes pass through unchanged, and end of input stops
//! sending but keeps printing until the VM ends or the command is interrupted.

use std::io::Write;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::api::ApiClient;
use crate::cli::state::VmDir;
use crate::cli::terminal::{self, RawModeGuard};

enum Input {
    Bytes(Vec<u8>),
    Detach,
}

/// Reason a console session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleEnd {
    /// The user pressed the escape key.
    Detached,
    /// The VMM closed the connection: the VM stopped.
    VmEnded,
}

/// Attaches this terminal to the serial console of `vm`, which must be running.
pub fn attach(vm: &VmDir) -> anyhow::Result<ConsoleEnd> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = ApiClient::unix(&vm.socket_path());
    let socket = runtime.block_on(client.console())?;

    let raw = RawModeGuard::enable(terminal::stdin_fd());
    let newline = if raw.is_some() { "\r\n" } else { "\n" };
    if raw.is_some() {
        report_inline!(
            "Connected to VM {}; press Ctrl-] to detach{newline}",
            vm.name()
        );
    }

    let (input_tx, mut input_rx) = mpsc::unbounded_channel();
    let detach_tx = input_tx.clone();
    terminal::spawn_stdin_reader(
        raw.is_some(),
        move |bytes| {
            let _ = input_tx.send(Input::Bytes(bytes.to_vec()));
        },
        move || {
            let _ = detach_tx.send(Input::Detach);
        },
    )?;

    let end = runtime.block_on(async move {
        let (mut sender, mut receiver) = socket.split();
        let mut stdout = std::io::stdout();
        let mut input_open = true;
        loop {
            tokio::select! {
                message = receiver.next() => match message {
                    Some(Ok(Message::Binary(bytes))) => {
                        stdout.write_all(&bytes)?;
                        stdout.flush()?;
                    }
                    Some(Ok(Message::Text(text))) => {
                        stdout.write_all(text.as_bytes())?;
                        stdout.flush()?;
                    }
                    Some(Ok(Message::Close(_))) | None => return Ok(ConsoleEnd::VmEnded),
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        tracing::debug!(%error, "console connection ended");
                        return Ok(ConsoleEnd::VmEnded);
                    }
                },
                input = input_rx.recv(), if input_open => match input {
                    Some(Input::Bytes(bytes)) => {
                        if sender.send(Message::Binary(bytes.into())).await.is_err() {
                            return Ok(ConsoleEnd::VmEnded);
                        }
                    }
                    Some(Input::Detach) => {
                        let _ = sender.send(Message::Close(None)).await;
                        return Ok(ConsoleEnd::Detached);
                    }
                    None => input_open = false,
                },
            }
        }
    });
    drop(raw);
    match end {
        Ok(ConsoleEnd::Detached) => report!("\nDetached from VM {}; it keeps running", vm.name()),
        Ok(ConsoleEnd::VmEnded) => report!("\nVM {} stopped", vm.name()),
        Err(_) => {}
    }
    end.map_err(|error: std::io::Error| error.into())
}
