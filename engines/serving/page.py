"""The playground at ``/``: one self-contained HTML page (no external assets) that submits a prompt as a job, shows
a live progress bar from the job's event stream, then the image, and the queue."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>diffaccel playground</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>
 body{font:15px system-ui,sans-serif;margin:2em auto;max-width:760px;color:#222}
 label{display:inline-block;margin:.3em 1em .3em 0} input{font:inherit;padding:.2em}
 #prompt{width:100%;box-sizing:border-box} button{font:inherit;padding:.3em 1.2em}
 #bar{height:14px;background:#eee;border-radius:7px;overflow:hidden;margin:1em 0}
 #fill{height:100%;width:0;background:#3a7;transition:width .1s}
 #out img{width:256px;image-rendering:pixelated;border:1px solid #ccc}
 table{border-collapse:collapse;font-size:13px} td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
 .err{color:#b00}
</style></head><body>
<h1>diffaccel playground</h1>
<form id="f">
 <input id="prompt" name="prompt" value="a small red circle at the top left on a navy background" required>
 <label>size <input id="size" name="size" placeholder="native, e.g. 64x64" size="12"></label>
 <label>steps <input id="steps" name="steps" type="number" min="1" value="20" style="width:5em"></label>
 <label>seed <input id="seed" name="seed" type="number" min="0" placeholder="random" style="width:8em"></label>
 <button id="go" type="submit">Generate</button>
</form>
<div id="status">idle</div>
<div id="bar"><div id="fill"></div></div>
<div id="out"></div>
<h3>Queue</h3><table id="queue"><thead><tr><th>job</th><th>status</th><th>prompt</th><th>step</th></tr></thead>
<tbody></tbody></table>
<script>
const $ = (id) => document.getElementById(id);
function show(text, bad) { $("status").textContent = text; $("status").className = bad ? "err" : ""; }
$("f").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = {prompt: $("prompt").value, steps: parseInt($("steps").value || "20", 10)};
  if ($("size").value.trim()) body.size = $("size").value.trim();
  if ($("seed").value.trim()) body.seed = parseInt($("seed").value, 10);
  $("fill").style.width = "0"; $("out").innerHTML = "";
  const r = await fetch("/v1/jobs", {method: "POST", headers: {"content-type": "application/json"},
                                     body: JSON.stringify(body)});
  const job = await r.json();
  if (!r.ok) { show(job.error ? job.error.message : ("HTTP " + r.status), true); return; }
  show("queued: job " + job.id);
  const es = new EventSource("/v1/jobs/" + job.id + "/events");
  es.addEventListener("start", () => show("running: job " + job.id));
  es.addEventListener("progress", (e) => {
    const d = JSON.parse(e.data); $("fill").style.width = (100 * d.step / d.steps) + "%";
    show("step " + d.step + " of " + d.steps);
  });
  es.addEventListener("completed", (e) => {
    es.close(); const d = JSON.parse(e.data);
    if (d.status !== "succeeded") { show(d.status + (d.error ? ": " + d.error : ""), true); return; }
    $("fill").style.width = "100%";
    for (const o of d.output) {
      const img = document.createElement("img"); img.src = o.url; img.alt = "seed " + o.seed;
      img.className = "result"; $("out").appendChild(img);
    }
    show("done: seed " + d.output[0].seed + ", " + d.metrics.run_s.toFixed(2) + " s in a batch of " +
         d.metrics.batch_size);
  });
});
async function refresh() {
  try {
    const r = await fetch("/v1/jobs?limit=10"); const d = await r.json();
    $("queue").tBodies[0].innerHTML = d.data.map((j) => "<tr><td>" + j.id.slice(0, 8) + "</td><td>" + j.status +
      "</td><td></td><td>" + j.progress.step + "/" + j.progress.steps + "</td></tr>").join("");
    d.data.forEach((j, i) => { $("queue").tBodies[0].rows[i].cells[2].textContent = j.input.prompt.slice(0, 60); });
  } catch (e) {}
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
