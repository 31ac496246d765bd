// Loads the console: wasm-bindgen's glue, then the WebAssembly module beside it.
import init from "./wafer_console.js";

init().catch((e) => {
  document.body.textContent = "The wafer console failed to start: " + e;
});
