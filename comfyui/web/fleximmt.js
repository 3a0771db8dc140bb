// The FlexiMMT node pack's frontend part: Learn Motion and Load Motion show the metadata of their
// motion (the text their node sends as its `ui.text`) in a read-only box on the node.
import { app } from "../../scripts/app.js";

const SHOWS_MOTION_INFO = ["FlexiMMTLearnMotion", "FlexiMMTLoadMotion"];
const INFO = "motion_info";

app.registerExtension({
  name: "FlexiMMT.MotionInfo",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SHOWS_MOTION_INFO.includes(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const { widget } = window.comfyAPI.widgets.ComfyWidgets.STRING(
        this, INFO, ["STRING", { multiline: true, placeholder: "the motion's metadata, once it runs" }], app,
      );
      widget.serialize = false; // not an input: never saved in the workflow nor sent to the server
      widget.options = { ...widget.options, serialize: false };
      if (widget.element) widget.element.readOnly = true;
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === INFO);
      if (widget) widget.value = (message?.text ?? []).join("\n\n");
    };
  },
});
