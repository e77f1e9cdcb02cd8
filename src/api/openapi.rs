//! The OpenAPI 3.0 description of the per-VM API, served at `GET /openapi.json`.
//!
//! A test in `tests/api.rs` sends a request for every operation listed here and checks that
//! the server routes it, so this document and the router cannot drift apart silently.

use serde_json::{json, Value};

/// Every (method, path) pair that the document describes, in the order it lists them.
pub const OPERATIONS: [(&str, &str); 5] = [
    ("get", "/vm"),
    ("put", "/vm/actions"),
    ("get", "/vm/metrics"),
    ("get", "/vm/console"),
    ("get", "/openapi.json"),
];

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

/// Returns the OpenAPI document.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "MonsterVM per-VM API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Control of one VM process. Served on <state>/vms/NAME/api.sock, and on TCP only with a token: a bearer token, the web console's login cookie (set by GET /?token=TOKEN) or, on /vm/console, the subprotocol monstervm-token.HEX next to monstervm-console. GET / serves the web console page, which this document does not list."
        },
        "paths": {
            "/vm": {
                "get": {
                    "operationId": "getVm",
                    "summary": "Returns the VM's name, state, backend and size",
                    "responses": {
                        "200": {
                            "description": "The VM",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/VmInfo"}}}
                        },
                        "401": error_response("Missing or wrong bearer token (TCP only)")
                    }
                }
            },
            "/vm/actions": {
                "put": {
                    "operationId": "putVmAction",
                    "summary": "Pauses, resumes, stops, shuts down or resets the VM",
                    "description": "pause returns once every vCPU has parked. stop types Ctrl-Alt-Del for the guest and the VMM exits when the guest powers off; with force true it ends the vCPUs at once. shutdown only types Ctrl-Alt-Del. reset boots the VM again in the same VMM process.",
                    "requestBody": {
                        "required": true,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ActionRequest"}}}
                    },
                    "responses": {
                        "204": {"description": "The action was accepted"},
                        "400": error_response("The body is not valid JSON"),
                        "401": error_response("Missing or wrong bearer token (TCP only)"),
                        "409": error_response("The VM's state does not allow the action, or shutdown found no way to ask the guest"),
                        "413": error_response("The body is larger than 16384 bytes"),
                        "415": error_response("The Content-Type is not application/json"),
                        "422": error_response("A field is missing, of the wrong type, or unknown, or force is set on an action other than stop"),
                        "503": error_response("A pause timed out before every vCPU parked; the VM stays paused")
                    }
                }
            },
            "/vm/metrics": {
                "get": {
                    "operationId": "getVmMetrics",
                    "summary": "Returns the VM's counters",
                    "responses": {
                        "200": {
                            "description": "The counters",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/VmMetrics"}}}
                        },
                        "401": error_response("Missing or wrong bearer token (TCP only)")
                    }
                }
            },
            "/vm/console": {
                "get": {
                    "operationId": "getVmConsole",
                    "summary": "Serial console over WebSocket: binary frames carry guest output to the client and client input to the guest; the recent output arrives first",
                    "responses": {
                        "101": {"description": "Switching to the WebSocket protocol"},
                        "400": error_response("The request is not a WebSocket upgrade"),
                        "401": error_response("Missing or wrong bearer token (TCP only)")
                    }
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "getOpenApi",
                    "summary": "Returns this document",
                    "responses": {"200": {"description": "The OpenAPI document", "content": {"application/json": {}}}}
                }
            }
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}}
                },
                "ActionRequest": {
                    "type": "object",
                    "required": ["action"],
                    "additionalProperties": false,
                    "properties": {
                        "action": {"type": "string", "enum": ["pause", "resume", "stop", "shutdown", "reset"]},
                        "force": {"type": "boolean", "default": false, "description": "Only with stop: end the vCPUs at once without asking the guest"}
                    }
                },
                "VmInfo": {
                    "type": "object",
                    "required": ["name", "state", "backend", "vcpus", "memory_mib", "pid", "uptime_secs", "boots"],
                    "properties": {
                        "name": {"type": "string"},
                        "state": {"type": "string", "enum": ["starting", "running", "paused", "stopping"]},
                        "backend": {"type": "string"},
                        "vcpus": {"type": "integer", "minimum": 1},
                        "memory_mib": {"type": "integer"},
                        "pid": {"type": "integer"},
                        "uptime_secs": {"type": "number"},
                        "boots": {"type": "integer"},
                        "guest_panicked": {"type": "boolean", "description": "the guest kernel reported a panic through pvpanic; the VM stops"}
                    }
                },
                "VmMetrics": {
                    "type": "object",
                    "required": ["uptime_secs", "memory_mib", "exits", "instructions", "unclaimed_io_accesses", "serial"],
                    "properties": {
                        "uptime_secs": {"type": "number"},
                        "memory_mib": {"type": "integer"},
                        "exits": {
                            "type": "object",
                            "nullable": true,
                            "description": "Null when the backend does not publish counters while its vCPUs run",
                            "properties": {
                                "pio": {"type": "integer"},
                                "mmio": {"type": "integer"},
                                "halt": {"type": "integer"}
                            }
                        },
                        "instructions": {"type": "integer", "nullable": true},
                        "unclaimed_io_accesses": {"type": "integer"},
                        "serial": {
                            "type": "object",
                            "properties": {
                                "bytes_out": {"type": "integer"},
                                "bytes_in": {"type": "integer"},
                                "viewers": {"type": "integer"}
                            }
                        }
                    }
                }
            }
        },
        "security": [{}, {"bearer": []}]
    })
}
