// Boot: the store's models (asking for the API key if the server wants one), then the
// live feed, and a redraw of what changed after each of its messages.

import { askKey, json } from "./api.js";
import { fillModelPicker, initChat } from "./chat.js";
import { connect, onChange } from "./live.js";
import {
  drawEvents, drawLegend, drawModels, drawNumbers, setStoreModels, wireModelButtons,
} from "./panels.js";
import { drawPools } from "./poolmap.js";

async function refreshStore() {
  const list = await json("/v1/models");
  setStoreModels(list.data.map((m) => ({ id: m.id, parent: m.parent || null })));
  fillModelPicker();
  drawModels();
}

let framed = false;     // one redraw per animation frame, however many messages came

async function main() {
  await refreshStore();
  document.getElementById("app").hidden = false;
  document.getElementById("key-button").onclick = async () => {
    await askKey();
    await refreshStore();
  };
  initChat();
  drawLegend();
  drawNumbers();
  wireModelButtons();
  let pools = false;
  let models = false;
  onChange((changed) => {
    drawEvents(changed);
    pools = pools || changed.pools;
    models = models || changed.models;
    if (framed) return;
    framed = true;
    requestAnimationFrame(() => {
      framed = false;
      if (pools) drawPools();
      if (models) drawModels();
      pools = models = false;
      drawNumbers();
    });
  });
  window.addEventListener("resize", () => drawPools());
  connect();
}

main();
