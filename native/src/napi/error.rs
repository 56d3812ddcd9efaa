//! How native errors cross into JavaScript: the message is a JSON object with the stable code and
//! the typed details, which `lib/nbd/errors.ts` turns into an `NbdError`.

use crate::error::{errno_name, Error};

pub fn to_napi(err: Error) -> napi::Error {
    let mut details = serde_json::json!({
        "code": err.code(),
        "message": err.to_string(),
    });
    if let Some(server) = err.server_error() {
        details["errno"] = errno_name(server.errno).into();
    }
    if let Some((command, offset, length)) = err.request() {
        details["command"] = command.into();
        details["offset"] = offset.into();
        details["length"] = length.into();
    }
    napi::Error::from_reason(details.to_string())
}

/// Shorthand for `result.map_err(to_napi)`.
pub trait IntoNapi<T> {
    fn napi(self) -> napi::Result<T>;
}

impl<T> IntoNapi<T> for Result<T, Error> {
    fn napi(self) -> napi::Result<T> {
        self.map_err(to_napi)
    }
}
