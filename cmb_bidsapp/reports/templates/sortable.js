// Sort a table by clicking its header: numbers numerically (n/a last), text alphabetically.
(function () {
  "use strict";
  function sortTable(table, th) {
    var col = Number(th.getAttribute("data-col"));
    var numeric = th.getAttribute("data-type") === "num";
    var asc = !th.classList.contains("sorted-asc");
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var va = a.cells[col].getAttribute("data-v");
      var vb = b.cells[col].getAttribute("data-v");
      if (va === "" && vb === "") { return 0; }
      if (va === "") { return 1; }
      if (vb === "") { return -1; }
      var d = numeric ? Number(va) - Number(vb) : va.localeCompare(vb, undefined, {numeric: true});
      return asc ? d : -d;
    });
    var frag = document.createDocumentFragment();
    rows.forEach(function (r) { frag.appendChild(r); });
    tbody.appendChild(frag);
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) {
      c.classList.remove("sorted-asc", "sorted-desc");
    });
    th.classList.add(asc ? "sorted-asc" : "sorted-desc");
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      th.addEventListener("click", function () { sortTable(table, th); });
    });
  });
})();
